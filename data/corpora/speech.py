"""Small, dependency-light speech synthesis over the eSpeak NG C library.

The shared library and its voice data come from the ``espeakng-loader`` wheel (no system
eSpeak needed); we drive the C API directly through :mod:`ctypes`::

    from modalign.data.corpora.speech import SpeechSynthesizer

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
import sys
import threading
import weakref
from pathlib import Path
from types import TracebackType

import numpy as np

from modalign.core.errors import UserInputError
from modalign.data.corpora.espeak import (
    AUDIO_OUTPUT_SYNCHRONOUS,
    BUFFER_MS,
    CHARS_UTF8,
    EE_OK,
    INITIALIZE_DONT_EXIT,
    PARAM_PITCH,
    PARAM_RANGE,
    PARAM_RATE,
    PITCH_RANGE,
    POS_CHARACTER,
    RAND_SEED,
    RANGE_RANGE,
    RATE_RANGE,
    SynthCallback,
    available_voices,
    declare,
    dlclose,
    import_loader,
    private_copy,
    remove_dir,
    variant_names,
)

__all__ = ["SpeechInputError", "SpeechSynthesizer", "available_voices"]


class SpeechInputError(UserInputError, ValueError):
    """Bad arguments to :meth:`SpeechSynthesizer.synthesize` (unknown voice, out-of-range rate).

    A :class:`~modalign.core.errors.UserInputError` (CLI exit status 2) and a ``ValueError``.
    """


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
        loader = import_loader()
        src = Path(loader.get_library_path())
        self._data_path = Path(loader.get_data_path())
        if not src.is_file():
            raise RuntimeError(f"espeakng-loader is installed but its library is missing: {src}")
        self._data_path_c = os.fsencode(self._data_path)
        self._variants = variant_names(self._data_path)
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
        self._callback = SynthCallback(_collect)
        # free() of the process allocator, which is the one the library's malloc() uses
        # (Windows DLLs may bring their own C runtime, so there we leave the table alone).
        self._free = None if sys.platform == "win32" else ctypes.CDLL(None).free
        if self._free is not None:
            self._free.argtypes = [ctypes.c_void_p]
            self._free.restype = None

        self._tmpdir, self._lib_path = private_copy(src)
        self._finalizer = weakref.finalize(self, remove_dir, self._tmpdir)
        try:
            lib, voice_table = self._load()
            try:
                self.sample_rate: int = lib.espeak_ng_GetSampleRate()
            finally:
                self._unload(lib, voice_table)
        except BaseException:
            self._finalizer()
            raise

    def _load(self) -> tuple[ctypes.CDLL, int | None]:
        """Load and initialise a pristine library image; returns it and its voice table."""
        lib = ctypes.CDLL(self._lib_path)
        try:
            declare(lib)
            # A never-initialised image reports sample rate 0. Anything else means the previous
            # image was not unloaded (someone else holds it) and its state would leak into
            # this call, breaking determinism, so refuse rather than return wrong audio.
            if lib.espeak_ng_GetSampleRate() != 0:
                raise RuntimeError(
                    "eSpeak NG library copy is still loaded from a previous call; "
                    "cannot guarantee a fresh synthesis state"
                )
            rate = lib.espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, self._data_path_c, INITIALIZE_DONT_EXIT
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
            dlclose(lib)
            raise
        return lib, voice_table

    def _unload(self, lib: ctypes.CDLL, voice_table: int | None) -> None:
        """Terminate eSpeak, free the voice table it leaks, and unload the image."""
        try:
            lib.espeak_Terminate()
            if voice_table and self._free is not None:
                self._free(voice_table)
        finally:
            dlclose(lib)

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
        encoded = self._check(text, voice, rate, pitch, range_)
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("SpeechSynthesizer is closed")
            lib, voice_table = self._load()
            try:
                pcm = self._speak(lib, encoded, voice, (rate, pitch, range_))
            finally:
                self._chunks.clear()
                self._unload(lib, voice_table)
        return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / np.float32(32768.0)

    def _check(self, text: str, voice: str, rate: int, pitch: int, range_: int) -> bytes:
        """Validate the arguments (SpeechInputError); the NUL-terminated UTF-8 text."""
        if not isinstance(text, str):
            raise SpeechInputError(f"text must be a str, got {type(text).__name__}")
        if "\x00" in text:
            raise SpeechInputError("text must not contain NUL characters")
        for name, value, (lo, hi) in (
            ("rate", rate, RATE_RANGE),
            ("pitch", pitch, PITCH_RANGE),
            ("range_", range_, RANGE_RANGE),
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
        return text.encode("utf-8") + b"\x00"

    def _speak(
        self, lib: ctypes.CDLL, encoded: bytes, voice: str, params: tuple[int, int, int]
    ) -> bytes:
        """Set voice and (rate, pitch, range) on a fresh image, synthesise; the 16-bit PCM."""
        if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != EE_OK:
            raise SpeechInputError(f"unknown eSpeak voice {voice!r}; see available_voices()")
        for param, value in zip((PARAM_RATE, PARAM_PITCH, PARAM_RANGE), params, strict=True):
            lib.espeak_SetParameter(param, int(value), 0)
        got_rate = lib.espeak_ng_GetSampleRate()
        if got_rate != self.sample_rate:  # e.g. an MBROLA voice; none are shipped
            raise RuntimeError(f"voice {voice!r} produces {got_rate} Hz, not {self.sample_rate} Hz")
        lib.espeak_ng_SetRandSeed(RAND_SEED)
        self._chunks.clear()
        status = lib.espeak_Synth(
            encoded, len(encoded), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None
        )
        if status != EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status}")
        return b"".join(self._chunks)

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
