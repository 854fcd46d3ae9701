"""Small, dependency-light speech synthesis over the eSpeak NG C library.

The shared library and its voice data come from the ``espeakng-loader`` wheel (no system
eSpeak needed); we drive the C API directly through :mod:`ctypes`::

    from modalign.data.speech import SpeechSynthesizer

    with SpeechSynthesizer() as tts:
        wave = tts.synthesize("seven", voice="en-us+f3", rate=200)  # float32, tts.sample_rate Hz

Design notes (why it is built this way):

* **Determinism.** eSpeak NG keeps a lot of hidden state in C globals and function-local statics
  (the pitch "flutter" phase, automatic gain control, klatt/breath resonators, a time-seeded
  random generator, ...). Initialising once and synthesising many times therefore makes the
  output depend on call history: measured, the same word comes back with a different length
  on the next call. Resetting individual variables does not reach all of it, so every call
  runs on a *freshly loaded* library: load, initialise, synthesise, terminate, unload. That
  costs a few milliseconds per call and makes ``synthesize(args)`` a pure function of its
  arguments, across calls, instances and processes.
* **No shared global state.** Each :class:`SpeechSynthesizer` loads its own private copy of the
  shared library (a file in a temporary directory; the dynamic loader shares one image per
  file, so a copy is the only way to get separate C globals). Several instances, other
  eSpeak users in the same process (e.g. a phonemizer on the original library) and threads
  (one instance per thread) do not interfere. This module holds no mutable module-level
  state; everything lives on the instance.
* **No leaks.** ``espeak_Terminate`` does not free the voice table built by
  ``espeak_ListVoices``; we free it ourselves before unloading, so the reload-per-call
  scheme stays flat in memory over many thousands of calls.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from types import ModuleType, TracebackType

import numpy as np

from modalign.core.errors import UserInputError

__all__ = ["SpeechInputError", "SpeechSynthesizer", "available_voices"]

# --- eSpeak NG C API constants (speak_lib.h) -------------------------------------------------
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # synthesise inside espeak_Synth, delivering audio to our callback
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit() on missing data
_POS_CHARACTER = 1
_CHARS_UTF8 = 1  # plain UTF-8 text: no SSML, no [[phoneme]] input
_EE_OK = 0
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
# Milliseconds of audio per callback; bigger means fewer Python round-trips.
_BUFFER_MS = 1000
# Fixed seed for eSpeak's own noise generator (breathy voices), otherwise seeded from the clock.
_RAND_SEED = 1

# Documented parameter ranges (speak_lib.h). eSpeak silently clamps outside them, which would
# hide a caller's mistake, so we reject instead.
_RATE_RANGE = (80, 450)
_PITCH_RANGE = (0, 100)
_RANGE_RANGE = (0, 100)

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
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)


class SpeechInputError(UserInputError, ValueError):
    """Bad arguments to :meth:`SpeechSynthesizer.synthesize` (unknown voice, out-of-range rate).

    A :class:`~modalign.core.errors.UserInputError` (CLI exit status 2) and a ``ValueError``.
    """


def _import_loader() -> ModuleType:
    """Import ``espeakng_loader`` lazily, so importing this module never requires it."""
    try:
        import espeakng_loader
    except ImportError as exc:
        raise RuntimeError(
            "speech synthesis needs the eSpeak NG library shipped by the 'espeakng-loader' "
            "package: pip install espeakng-loader  (or: pip install 'modalign[demo]')"
        ) from exc
    return espeakng_loader


def _variant_names(data_path: Path) -> frozenset[str]:
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
    data_path = Path(_import_loader().get_data_path())
    bases = _language_voice_files(data_path)
    variants = _variant_names(data_path)
    voices: list[str] = []
    for base in _ENGLISH_BASES:
        if base not in bases:
            continue
        voices.append(base)
        voices.extend(f"{base}+{v}" for v in _CLASSIC_VARIANTS if v in variants)
    return voices


def _declare(lib: ctypes.CDLL) -> None:
    """Set ctypes prototypes, so arguments are converted and checked as C expects."""
    c_int, c_uint = ctypes.c_int, ctypes.c_uint
    lib.espeak_Initialize.argtypes = [c_int, c_int, ctypes.c_char_p, c_int]
    lib.espeak_Initialize.restype = c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
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


def _dlclose(lib: ctypes.CDLL) -> None:
    """Unload a library for real (ctypes never does), so the next load has pristine globals."""
    import _ctypes

    if sys.platform == "win32":
        _ctypes.FreeLibrary(lib._handle)  # type: ignore[attr-defined]
    else:
        _ctypes.dlclose(lib._handle)  # type: ignore[attr-defined]


def _remove_dir(path: str) -> None:
    """Finalizer body: delete the private library copy (best effort, also at exit)."""
    shutil.rmtree(path, ignore_errors=True)


class SpeechSynthesizer:
    """Text-to-speech with eSpeak NG: ``synthesize(text) -> float32 waveform``.

    Use as a context manager or call :meth:`close` (a finalizer also cleans up). Each call of
    :meth:`synthesize` runs on a freshly loaded private copy of the library, so results are
    deterministic and instances are independent; calls on one instance are serialised with a
    lock, and separate instances may run in parallel threads.

    Attributes:
        sample_rate: Output sample rate in Hz, as reported by eSpeak NG (22050 for the
            shipped voices).
    """

    def __init__(self) -> None:
        loader = _import_loader()
        src = Path(loader.get_library_path())
        self._data_path = Path(loader.get_data_path())
        if not src.is_file():
            raise RuntimeError(f"espeakng-loader is installed but its library is missing: {src}")
        self._data_path_c = os.fsencode(self._data_path)
        self._variants = _variant_names(self._data_path)
        self._lock = threading.Lock()
        # Audio chunks of the call in progress. The callback closes over this list, not over
        # self, so the instance can still be garbage collected (and finalised) normally.
        self._chunks: list[bytes] = []
        chunks = self._chunks

        def _collect(wav: int | None, numsamples: int, _events: int | None) -> int:
            if numsamples > 0 and wav:
                chunks.append(ctypes.string_at(wav, numsamples * 2))
            return 0  # 0 = continue synthesis

        # Keep the C thunk referenced for the instance's lifetime: the library calls it.
        self._callback = _SynthCallback(_collect)
        # free() of the process allocator, which is the one the library's malloc() uses
        # (Windows DLLs may bring their own C runtime, so there we leave the table alone).
        self._free = None if sys.platform == "win32" else ctypes.CDLL(None).free
        if self._free is not None:
            self._free.argtypes = [ctypes.c_void_p]
            self._free.restype = None

        self._tmpdir, self._lib_path = self._private_copy(src)
        self._finalizer = weakref.finalize(self, _remove_dir, self._tmpdir)
        try:
            lib, voice_table = self._load()
            try:
                self.sample_rate: int = lib.espeak_ng_GetSampleRate()
            finally:
                self._unload(lib, voice_table)
        except BaseException:
            self._finalizer()
            raise

    # ------------------------------------------------------------------ library lifecycle
    @staticmethod
    def _private_copy(src: Path) -> tuple[str, str]:
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
                _dlclose(ctypes.CDLL(path))  # probe: can code be loaded from here?
                return tmpdir, path
            except OSError as exc:
                errors.append(f"{parent or tempfile.gettempdir()}: {exc}")
                if tmpdir is not None:
                    shutil.rmtree(tmpdir, ignore_errors=True)
        raise RuntimeError(
            "could not load a private copy of the eSpeak NG library from any writable "
            "directory (is it mounted noexec?): " + "; ".join(errors)
        )

    def _load(self) -> tuple[ctypes.CDLL, int | None]:
        """Load and initialise a pristine library image; returns it and its voice table."""
        lib = ctypes.CDLL(self._lib_path)
        try:
            _declare(lib)
            # A never-initialised image reports sample rate 0. Anything else means the previous
            # image was not unloaded (someone else holds it) and its state would leak into
            # this call, breaking determinism, so refuse rather than return wrong audio.
            if lib.espeak_ng_GetSampleRate() != 0:
                raise RuntimeError(
                    "eSpeak NG library copy is still loaded from a previous call; "
                    "cannot guarantee a fresh synthesis state"
                )
            rate = lib.espeak_Initialize(
                _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, self._data_path_c, _INITIALIZE_DONT_EXIT
            )
            if rate <= 0:
                raise RuntimeError(
                    f"eSpeak NG failed to initialise with data directory {self._data_path} "
                    "(a very long path is truncated by eSpeak; reinstall espeakng-loader)"
                )
            lib.espeak_SetSynthCallback(self._callback)
            # Build the voice table now (espeak_SetVoiceByName would do it anyway): this call
            # returns the table's address, which espeak_Terminate never frees, see _unload.
            voice_table = lib.espeak_ListVoices(None)
        except BaseException:
            _dlclose(lib)
            raise
        return lib, voice_table

    def _unload(self, lib: ctypes.CDLL, voice_table: int | None) -> None:
        """Terminate eSpeak, free the voice table it leaks, and unload the image."""
        try:
            lib.espeak_Terminate()
            if voice_table and self._free is not None:
                self._free(voice_table)
        finally:
            _dlclose(lib)

    # ------------------------------------------------------------------ public API
    def available_voices(self) -> list[str]:
        """English voice names known to work; see the module-level :func:`available_voices`."""
        return available_voices()

    def synthesize(
        self,
        text: str,
        voice: str = "en",
        rate: int = 175,
        pitch: int = 50,
        range_: int = 50,
    ) -> np.ndarray:
        """Speak ``text`` and return the waveform.

        Args:
            text: Plain text (UTF-8 capable; no SSML).
            voice: eSpeak voice name, optionally with a variant: ``"en"``, ``"en-us"``,
                ``"en+f3"``, ``"en-us+m3"``. See :func:`available_voices`.
            rate: Speaking rate in words per minute, 80..450.
            pitch: Base pitch, 0..100 (50 = the voice's normal pitch).
            range_: Pitch range, 0..100 (0 = monotone, 50 = normal).

        Returns:
            1-D ``float32`` array in [-1, 1) at :attr:`sample_rate` Hz. The same arguments
            always give the same samples.

        Raises:
            SpeechInputError: unknown voice or variant, parameter out of range, NUL in text.
            RuntimeError: the synthesizer is closed or eSpeak NG fails.
        """
        if not isinstance(text, str):
            raise SpeechInputError(f"text must be a str, got {type(text).__name__}")
        if "\x00" in text:
            raise SpeechInputError("text must not contain NUL characters")
        for name, value, (lo, hi) in (
            ("rate", rate, _RATE_RANGE),
            ("pitch", pitch, _PITCH_RANGE),
            ("range_", range_, _RANGE_RANGE),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise SpeechInputError(f"{name} must be an int, got {value!r}")
            if not lo <= value <= hi:
                raise SpeechInputError(f"{name}={value} is outside eSpeak's range {lo}..{hi}")
        if not isinstance(voice, str) or not voice.partition("+")[0]:
            raise SpeechInputError(f"voice must be 'NAME' or 'NAME+VARIANT', got {voice!r}")
        variant = voice.partition("+")[2]
        # eSpeak ignores an unknown variant without any error, so check it ourselves.
        if variant and variant not in self._variants:
            raise SpeechInputError(
                f"unknown eSpeak voice variant {variant!r} in {voice!r}; shipped variants "
                "include m1..m8 and f1..f5, see available_voices()"
            )
        encoded = text.encode("utf-8") + b"\x00"

        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("SpeechSynthesizer is closed")
            lib, voice_table = self._load()
            try:
                if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != _EE_OK:
                    raise SpeechInputError(
                        f"unknown eSpeak voice {voice!r}; see available_voices()"
                    )
                for param, value in (
                    (_PARAM_RATE, rate),
                    (_PARAM_PITCH, pitch),
                    (_PARAM_RANGE, range_),
                ):
                    lib.espeak_SetParameter(param, int(value), 0)
                got_rate = lib.espeak_ng_GetSampleRate()
                if got_rate != self.sample_rate:  # e.g. an MBROLA voice; none are shipped
                    raise RuntimeError(
                        f"voice {voice!r} produces {got_rate} Hz, not {self.sample_rate} Hz"
                    )
                lib.espeak_ng_SetRandSeed(_RAND_SEED)
                self._chunks.clear()
                status = lib.espeak_Synth(
                    encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
                )
                if status != _EE_OK:
                    raise RuntimeError(f"espeak_Synth failed with status {status}")
                pcm = b"".join(self._chunks)
            finally:
                self._chunks.clear()
                self._unload(lib, voice_table)
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / np.float32(32768.0)

    def close(self) -> None:
        """Delete the private library copy. Idempotent; later synthesize() calls raise."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> SpeechSynthesizer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._finalizer.alive else "closed"
        return f"SpeechSynthesizer(sample_rate={self.sample_rate}, {state})"
