"""The eSpeak NG C library through :mod:`ctypes`: constants, prototypes, loading and voices.

Used by :class:`modalign.data.corpora.speech.SpeechSynthesizer`, which explains the reload-per-call
design; this module holds no mutable state.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

# --- eSpeak NG C API constants (speak_lib.h) -------------------------------------------------
AUDIO_OUTPUT_SYNCHRONOUS = 2  # synthesise inside espeak_Synth, delivering audio to our callback
INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() on missing data
POS_CHARACTER = 1
CHARS_UTF8 = 1  # plain UTF-8 text: no SSML, no [[phoneme]] input
EE_OK = 0
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
# Milliseconds of audio per callback; bigger means fewer Python round-trips.
BUFFER_MS = 1000
# Fixed seed for eSpeak's own noise generator (breathy voices), otherwise seeded from the clock.
RAND_SEED = 1

# Documented parameter ranges (speak_lib.h). eSpeak silently clamps outside them, which would
# hide a caller's mistake, so we reject instead.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)
RANGE_RANGE = (0, 100)

# English base voices offered by available_voices(), and the classic male/female variants.
# Immutable; filtered against the shipped data at call time.
_ENGLISH_BASES = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
    "en-029",
)
_CLASSIC_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))

# int (*t_espeak_callback)(short *wav, int numsamples, espeak_EVENT *events)
SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


def import_loader() -> ModuleType:
    """Import ``espeakng_loader`` lazily, so importing this module never requires it."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise RuntimeError(
            "speech synthesis needs the eSpeak NG library shipped by the 'espeakng-loader' "
            "package: pip install espeakng-loader  (or: pip install 'modalign[demo]')"
        ) from exc
    return espeakng_loader


def variant_names(data_path: Path) -> frozenset[str]:
    """Voice variant names (the part after ``+``) present in the shipped data."""
    vdir = data_path / "voices" / "!v"
    if not vdir.is_dir():
        return frozenset()
    return frozenset(p.name for p in vdir.iterdir() if p.is_file())


def _language_voice_files(data_path: Path) -> frozenset[str]:
    """Lower-cased language voice names (e.g. ``en-gb-x-rp``) present in the shipped data."""
    ldir = data_path / "lang"
    if not ldir.is_dir():
        return frozenset()
    return frozenset(p.name.lower() for p in ldir.rglob("*") if p.is_file())


def available_voices() -> list[str]:
    """English voice names that work with the shipped eSpeak NG data.

    Every English base voice (``en``, ``en-us``, ``en-gb-x-rp``, ``en-gb-scotland``, ...)
    alone and combined with the classic variants ``+m1``..``+m8`` and ``+f1``..``+f5``, limited
    to what the installed data contains. Any other eSpeak voice name or variant (e.g.
    ``fr``, ``en+klatt``, ``en+whisper``) can still be passed to
    :meth:`SpeechSynthesizer.synthesize`.

    Raises:
        RuntimeError: ``espeakng-loader`` is not installed.
    """
    data_path = Path(import_loader().get_data_path())
    bases = _language_voice_files(data_path)
    variants = variant_names(data_path)
    voices: list[str] = []
    for base in _ENGLISH_BASES:
        if base not in bases:
            continue
        voices.append(base)
        voices.extend(f"{base}+{v}" for v in _CLASSIC_VARIANTS if v in variants)
    return voices


def declare(lib: ctypes.CDLL) -> None:
    """Set ctypes prototypes, so arguments are converted and checked as C expects."""
    c_int, c_uint = ctypes.c_int, ctypes.c_uint
    lib.espeak_Initialize.argtypes = [c_int, c_int, ctypes.c_char_p, c_int]
    lib.espeak_Initialize.restype = c_int
    lib.espeak_SetSynthCallback.argtypes = [SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.c_void_p
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = c_int
    lib.espeak_SetParameter.argtypes = [c_int, c_int, c_int]
    lib.espeak_SetParameter.restype = c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = c_int
    lib.espeak_ng_GetSampleRate.argtypes = []
    lib.espeak_ng_GetSampleRate.restype = c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p,
        ctypes.c_size_t,
        c_uint,
        c_int,
        c_uint,
        c_uint,
        ctypes.POINTER(c_uint),
        ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = c_int
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = c_int


def dlclose(lib: ctypes.CDLL) -> None:
    """Unload a library for real (ctypes never does), so the next load has pristine globals."""
    import _ctypes

    if sys.platform == "win32":
        _ctypes.FreeLibrary(lib._handle)  # type: ignore[attr-defined]
    else:
        _ctypes.dlclose(lib._handle)


def remove_dir(path: str) -> None:
    """Finalizer body: delete the private library copy (best effort, also at exit)."""
    shutil.rmtree(path, ignore_errors=True)


def private_copy(src: Path) -> tuple[str, str]:
    """Copy the shared library somewhere we can load it from; returns (dir, path).

    Some systems mount the temp dir ``noexec`` (dlopen fails there), so fall back to a
    per-user runtime or cache directory.
    """
    candidates = [
        None,
        os.environ.get("XDG_RUNTIME_DIR"),
        str(Path.home() / ".cache" / "modalign"),
    ]
    errors: list[str] = []
    for parent in candidates:
        if parent is not None and not parent:
            continue
        tmpdir = None
        try:
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            tmpdir = tempfile.mkdtemp(prefix="modalign-espeak-", dir=parent)
            path = os.path.join(tmpdir, src.name)
            shutil.copyfile(src, path)
            dlclose(ctypes.CDLL(path))  # probe: can code be loaded from here?
            return tmpdir, path
        except OSError as exc:
            errors.append(f"{parent or tempfile.gettempdir()}: {exc}")
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
    raise RuntimeError(
        "could not load a private copy of the eSpeak NG library from any writable "
        "directory (is it mounted noexec?): " + "; ".join(errors)
    )
