"""emakit's native CPU kernels: built once with the system C compiler, cached, called via ctypes.

torch updates a group of tensors one kernel launch per tensor (``_foreach_lerp_`` on CPU is a
loop of ``lerp_``: about 1.4 us of dispatch each), and has no kernel that folds a bfloat16
weight into a float32 shadow without a converted copy. ``kernels.c`` (next to this file) does a
whole group in one call, converting on the fly, with torch's rounding: the result is bitwise
equal to ``Tensor.lerp_``, checked on every load against torch itself (but for the sign of a
zero result at weight 1, a decay-0 update, where torch's vectorised body and scalar tail
disagree with each other, and the bits of a NaN; these kernels follow the body).

The first use on a machine compiles ``kernels.c`` with ``cc -O3 -march=native -fopenmp`` (about
a quarter of a second) into a cache folder (``$EMAKIT_CACHE``, else ``$XDG_CACHE_HOME/emakit``, else
``~/.cache/emakit``), keyed by the source, the compiler and the CPU; later processes load the
cached library in about 15 ms. OpenMP comes from the ``libgomp`` torch already loaded, so both
share one thread pool; the kernels use ``torch.get_num_threads()`` threads (one in a forked
child, and one for small groups).

``EMAKIT_NATIVE`` chooses: ``auto`` (the default: native kernels where they build and pass the
check, torch's eager kernels otherwise; a compiler that fails gives one ``EMAWarning``, a
missing one none), ``0`` (always eager), ``1`` (native, or an error saying why not).
:func:`status` says which is in use, and why.

Example:
    >>> import torch
    >>> k = kernels()
    >>> shadow, weight = torch.zeros(3), torch.tensor([1.0, 2.0, 4.0]).bfloat16()
    >>> if k is not None:
    ...     k.lerp([[shadow]], [weight], [0.5])
    ... else:
    ...     _ = shadow.lerp_(weight.float(), 0.5)
    >>> shadow
    tensor([0.5000, 1.0000, 2.0000])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from emakit.errors import EMAWarning, user_stacklevel

__all__ = ["KINDS", "PEAK_KINDS", "Kernels", "LerpCall", "Table", "kernels", "status"]

ABI = 1
"""The number ``emakit_kernels_version()`` returns; a library with another is rebuilt."""

KINDS = {(torch.float32, torch.float32): 0, (torch.float32, torch.bfloat16): 1,
         (torch.float32, torch.float16): 2, (torch.float64, torch.float64): 3}
"""(shadow dtype, source dtype) -> the kernels' element kind; pairs not listed stay eager."""

PEAK_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
"""Source dtype -> the element kind :meth:`Kernels.peak` reads."""

_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp",
          "-shared", "-fPIC"]
_lock = threading.Lock()
_loaded: Kernels | None = None
_why_not: str | None = None  # set once a build or load failed: not tried again in this process


class Table:
    """The addresses and prefix sums of a fixed list of tensors, as the kernels take them.

    ``hold=True`` keeps the tensors (their memory stays alive while the table does, so an
    address recorded here is still that memory at every call); ``hold=False`` keeps only the
    addresses, for tensors whose owner checks before every call that they are still there.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, nbytes: bool = False,
                 hold: bool = True) -> None:
        self.tensors = list(tensors) if hold else []
        self.pointers = (ctypes.c_void_p * max(len(tensors), 1))(
            *[t.data_ptr() for t in tensors])
        sizes = [t.numel() * (t.element_size() if nbytes else 1) for t in tensors]
        prefix = [0]
        for n in sizes:
            prefix.append(prefix[-1] + n)
        self.prefix = (ctypes.c_int64 * len(prefix))(*prefix)
        self.count = len(tensors)


class Kernels:
    """The loaded library: :meth:`lerp`, :meth:`peak` and :meth:`copy` over tables of tensors."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._lib = library
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        library.emakit_lerp.argtypes = [i64, ctypes.c_int, p, p, p, ctypes.c_int, p, ctypes.c_int]
        library.emakit_lerp.restype = None
        library.emakit_peak.argtypes = [i64, p, p, ctypes.c_int, ctypes.c_int]
        library.emakit_peak.restype = ctypes.c_double
        library.emakit_copy.argtypes = [i64, p, p, p, ctypes.c_int]
        library.emakit_copy.restype = None
        library.emakit_guarded_lerp.argtypes = [i64, p, p, p, ctypes.c_int, ctypes.c_double,
                                                ctypes.c_double, p, ctypes.c_int]
        library.emakit_guarded_lerp.restype = ctypes.c_double
        self._pid = os.getpid()

    def threads(self) -> int:
        """torch's intra-op thread count (1 in a forked child: its OpenMP pool is not usable)."""
        return torch.get_num_threads() if os.getpid() == self._pid else 1

    def lerp_call(self, shadows: Sequence[Table], source: Table, kind: int
                  ) -> LerpCall:
        """A prepared call folding ``source`` into each table of ``shadows`` (one per average)."""
        return LerpCall(self, shadows, source, kind)

    def lerp(self, shadows: Sequence[Sequence[torch.Tensor]], sources: Sequence[torch.Tensor],
             weights: Sequence[float]) -> None:
        """``shadows[i][j].lerp_(sources[j], weights[i])`` for all i, j (contiguous tensors)."""
        kind = KINDS[(shadows[0][0].dtype, sources[0].dtype)]
        self.lerp_call([Table(s) for s in shadows], Table(sources), kind)(weights)

    def guarded_lerp(self, shadows: Table, sources: Table, kind: int, weight: float,
                     limit: float) -> tuple[list[int], float]:
        """``shadows[j].lerp_(sources[j], weight)`` for each j whose source is all at most
        ``limit`` in magnitude (so finite); returns the positions j left alone, and the largest
        magnitude folded in."""
        failed = (ctypes.c_uint8 * max(sources.count, 1))()
        top = self._lib.emakit_guarded_lerp(sources.count, shadows.pointers, sources.pointers,
                                            sources.prefix, kind, weight, limit, failed,
                                            self.threads())
        return [j for j in range(sources.count) if failed[j]] if any(failed) else [], top

    def peak(self, table: Table, dtype: torch.dtype) -> float:
        """``max |x|`` over the table's tensors (NaN if one is NaN; 0.0 for none)."""
        return float(self._lib.emakit_peak(table.count, table.pointers, table.prefix,
                                           PEAK_KINDS[dtype], self.threads()))

    def copy(self, dsts: Table, srcs: Table) -> None:
        """``dsts[j].copy_(srcs[j])`` byte for byte (tables made with ``nbytes=True``)."""
        self._lib.emakit_copy(srcs.count, dsts.pointers, srcs.pointers, srcs.prefix,
                              self.threads())


class LerpCall:
    """One lerp kernel call with its operands laid out once: calling it costs one ctypes call."""

    def __init__(self, kernels: Kernels, shadows: Sequence[Table], source: Table,
                 kind: int) -> None:
        self.kernels = kernels
        self.tables = (list(shadows), source)  # keeps the memory alive
        members = len(shadows)
        addresses = [a for t in shadows for a in t.pointers[:t.count]]
        self.shadows = (ctypes.c_void_p * max(len(addresses), 1))(*addresses)
        self.weights = (ctypes.c_double * members)()
        self.args = (source.count, members, self.shadows, source.pointers, source.prefix, kind)
        self.fn = kernels._lib.emakit_lerp

    def __call__(self, weights: Sequence[float]) -> None:
        self.weights[:] = list(weights)
        self.fn(*self.args, self.weights, self.kernels.threads())


def kernels() -> Kernels | None:
    """The native kernels, built or loaded on first use; None where ``EMAKIT_NATIVE`` is ``0``
    or they cannot be had (then :func:`status` says why).

    Raises:
        RuntimeError: ``EMAKIT_NATIVE=1`` and the kernels cannot be built or loaded.
        ValueError: ``EMAKIT_NATIVE`` is not ``auto``, ``0`` or ``1``.
    """
    choice = _choice()
    if choice == "0":
        return None
    global _loaded, _why_not
    if _loaded is None and _why_not is None:
        with _lock:
            if _loaded is None and _why_not is None:
                try:
                    _loaded = _load()
                except _NoCompilerError as e:  # expected on such machines: no warning
                    _why_not = str(e)
                except _UnavailableError as e:
                    _why_not = str(e)
                    if choice == "auto":
                        warnings.warn(
                            f"emakit's native CPU kernels are unavailable ({_why_not}); the "
                            f"updates run on torch's kernels, slower on models with many "
                            f"tensors or bf16 weights. EMAKIT_NATIVE=0 silences this.",
                            EMAWarning, stacklevel=user_stacklevel())
    if _loaded is None and choice == "1":
        raise RuntimeError(f"EMAKIT_NATIVE=1, but emakit's native kernels are unavailable: "
                           f"{str(_why_not).rstrip('.')}. Install a C compiler with OpenMP "
                           f"(gcc), or set EMAKIT_NATIVE=auto to use torch's kernels.")
    return _loaded


def status() -> str:
    """Which update kernels the torch backend uses on CPU, and why (one line)."""
    try:
        k = kernels()
    except RuntimeError as e:
        return str(e)
    if k is not None:
        return f"native ({k.path})"
    if _choice() == "0":
        return "eager (EMAKIT_NATIVE=0)"
    return f"eager (native kernels unavailable: {_why_not})"


def _choice() -> str:
    choice = os.environ.get("EMAKIT_NATIVE", "auto").strip().lower() or "auto"
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"EMAKIT_NATIVE={choice!r} is not a valid choice: use 'auto' (native "
                         f"kernels where available, the default), '0' (torch's kernels) or '1' "
                         f"(native kernels, or an error).")
    return choice


class _UnavailableError(Exception):
    """The native kernels cannot be built or loaded here (the message says why)."""


class _NoCompilerError(_UnavailableError):
    """No C compiler, or a platform the kernels are not built on: torch's kernels, silently."""


def _load() -> Kernels:
    if sys.platform not in ("linux", "darwin"):
        raise _NoCompilerError(f"built only on Linux and macOS (this is {sys.platform})")
    compiler = _compiler()
    path = _cache_dir() / f"kernels-{_key(compiler)}.so"
    if not path.exists():
        _build(compiler, path)
    try:
        library = _open(path)
    except _UnavailableError:  # a damaged cached file (a crash while copying it in): build anew
        _build(compiler, path)
        library = _open(path)
    _check_one_openmp()
    k = Kernels(library, path)
    _self_check(k)
    return k


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` (split like a shell word list: ``ccache gcc``), else cc or
    gcc on the PATH."""
    given = os.environ.get("CC", "").strip()
    if given:
        try:
            return shlex.split(given)
        except ValueError as e:
            raise _UnavailableError(f"CC={given!r} cannot be split into words: {e}") from None
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise _NoCompilerError("no C compiler found (cc, gcc, or $CC)")
    return [found]


def _complete(path: Path) -> bool:
    """Whether a built library is whole: an ELF file cut short (a crash while it was copied in,
    a full disk) would pass ``dlopen`` and then kill the process (SIGBUS) when touched. Its
    section headers end the file; other formats are taken as they are."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if head[:4] != b"\x7fELF":
        return head[:4] in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe")  # Mach-O
    if head[4] != 2 or len(head) < 64:  # ELF32 is not built here: refuse, then rebuild
        return False
    big = head[5] != 1

    def field(lo: int, hi: int) -> int:
        return int.from_bytes(head[lo:hi], "big" if big else "little")

    phoff, shoff = field(32, 40), field(40, 48)
    phsize, phnum, shsize, shnum = field(54, 56), field(56, 58), field(58, 60), field(60, 62)
    return phoff + phsize * phnum <= size and shoff + shsize * shnum <= size and shnum > 0


def _open(path: Path) -> ctypes.CDLL:
    if not _complete(path):
        raise _UnavailableError(f"{path} is incomplete")
    try:
        library = ctypes.CDLL(str(path))
        version = library.emakit_kernels_version()
    except (OSError, AttributeError) as e:
        raise _UnavailableError(f"{path} did not load: {e}") from None
    if version != ABI:
        raise _UnavailableError(f"{path} is of another emakit version")
    return library


def _cache_dir() -> Path:
    root = os.environ.get("EMAKIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "emakit" if xdg else Path.home() / ".cache" / "emakit"


def _key(compiler: list[str]) -> str:
    """A digest of everything the built library depends on: a change builds a new one."""
    h = hashlib.sha256(_SOURCE.read_bytes())
    h.update(" ".join([*compiler, *_FLAGS, platform.machine(), str(ABI)]).encode())
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, timeout=30,
                                 check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _UnavailableError(f"{' '.join(compiler)} --version failed: {e}") from None
    h.update(version)
    h.update(_cpu_flags().encode())  # -march=native: another CPU needs another build
    return h.hexdigest()[:20]


def _cpu_flags() -> str:
    """The first CPU's model and instruction-set flags (a VM may hide some of a model's)."""
    keep: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                if line.startswith(("flags", "Features", "model name", "CPU part")):
                    keep.append(line.strip())
    except OSError:
        pass
    return "\n".join(keep) or platform.processor()


def _build(compiler: list[str], path: Path) -> None:
    """Compile into a temporary file, flush it, make it readable by all (a shared cache), and
    rename it into place (other processes never see half a library; two building at once both
    succeed)."""
    name = " ".join(compiler)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".build-", suffix=".so")
        os.close(fd)
    except OSError as e:
        raise _UnavailableError(f"cannot write the cache folder {path.parent}: {e} (set "
                                f"EMAKIT_CACHE to a writable folder)") from None
    try:
        for flags in (_FLAGS, [f for f in _FLAGS if f != "-march=native"]):
            try:
                done = subprocess.run([*compiler, *flags, "-o", tmp, str(_SOURCE)],
                                      capture_output=True, text=True, timeout=300, check=False)
            except (OSError, subprocess.SubprocessError) as e:
                raise _UnavailableError(f"{name} failed to run: {e}") from None
            if done.returncode == 0:
                try:
                    with open(tmp, "rb") as f:
                        os.fsync(f.fileno())
                    os.chmod(tmp, 0o755)
                    os.replace(tmp, path)
                except OSError as e:
                    raise _UnavailableError(f"cannot put the built kernels at {path}: {e} "
                                            f"(set EMAKIT_CACHE to a folder of your own)") from None
                return
        raise _UnavailableError(f"{name} could not build {_SOURCE.name}: "
                                f"{_first_error(done.stderr)}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _first_error(log: str) -> str:
    """The line of a compiler's output that says what went wrong (``omp.h: No such file``),
    not the last one (``compilation terminated.``)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[0] if lines else "(no message)"


def _check_one_openmp() -> None:
    """Refuse a second OpenMP runtime next to torch's (two thread pools would fight)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            files = {line.split()[-1] for line in f if "/" in line}
    except OSError:  # not Linux: nothing to read; the self-check still runs
        return
    runtimes = sorted(p for p in files
                      if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp")))
    if len(runtimes) > 1:
        raise _UnavailableError(
            f"the kernels' OpenMP runtime is not torch's ({', '.join(runtimes)})")


def _self_check(k: Kernels) -> None:
    """Compare the kernels with torch's own on awkward values: any difference refuses them."""
    g = torch.Generator().manual_seed(0)
    n = 2 * 32768 + 37  # two threads where there are two, and a tail
    for (shadow_dtype, source_dtype) in KINDS:
        base = torch.randn(n, generator=g, dtype=torch.float64).to(shadow_dtype)
        near = base + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64).to(shadow_dtype)
        source = near.to(source_dtype)
        for w in (1e-3, 0.5, 0.999):  # both of torch's formulas
            expect = base.clone().lerp_(source.to(shadow_dtype), w)
            got = base.clone()
            k.lerp([[got]], [source], [w])
            if not torch.equal(got, expect):
                raise _UnavailableError(f"the built kernels round differently from torch "
                                   f"({shadow_dtype} from {source_dtype}, weight {w})")
        source[n // 3] = float("nan")
        if not torch.isnan(torch.tensor(k.peak(Table([source]), source_dtype))):
            raise _UnavailableError("the built kernels missed a NaN")
