"""Tests for the eSpeak NG synthesizer (``modalign.data.corpora.speech``).

Everything that needs the library skips cleanly when ``espeakng-loader`` is not installed; the
missing-package error message is checked either way.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from modalign.core.errors import UserInputError
from modalign.data.corpora.speech import SpeechInputError, SpeechSynthesizer, available_voices

# A clearly audible word: eSpeak's output peaks around 0.7 and has RMS near 0.08.
MIN_RMS = 0.01


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


def digest(wave: np.ndarray) -> str:
    return hashlib.sha1(wave.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def tts() -> Iterator[SpeechSynthesizer]:
    pytest.importorskip("espeakng_loader", reason="needs the espeakng-loader package")
    with SpeechSynthesizer() as synth:
        yield synth


def test_seven_two_voices_is_speech_and_differs(tts: SpeechSynthesizer) -> None:
    a = tts.synthesize("seven", voice="en-us+m3", rate=150, pitch=40)
    b = tts.synthesize("seven", voice="en+f3", rate=220, pitch=70, range_=80)
    for wave in (a, b):
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert np.abs(wave).max() <= 1.0
        assert rms(wave) > MIN_RMS
        # One short word: a fraction of a second up to about a second.
        assert 0.2 < len(wave) / tts.sample_rate < 1.5
    assert len(a) != len(b)
    n = min(len(a), len(b))
    assert not np.allclose(a[:n], b[:n])


def test_sample_rate_is_what_espeak_reports(tts: SpeechSynthesizer) -> None:
    assert isinstance(tts.sample_rate, int)
    assert tts.sample_rate == 22050  # every voice shipped by espeakng-loader


def test_same_arguments_give_identical_samples(tts: SpeechSynthesizer) -> None:
    args = ("seven", "en-us+f3", 190, 55, 60)  # f3 is breathy: exercises the noise generator
    first = tts.synthesize(*args)
    # eSpeak keeps hidden state between calls; other calls in between must not leak into ours.
    tts.synthesize("Hello, world! 42 apples.", "en+klatt", 300, 10, 90)
    tts.synthesize("one two three", "en-gb-scotland+m7", 80, 99, 0)
    second = tts.synthesize(*args)
    assert np.array_equal(first, second)


def test_rate_changes_duration(tts: SpeechSynthesizer) -> None:
    text = "seven seven seven"
    slow = tts.synthesize(text, rate=100)
    normal = tts.synthesize(text, rate=175)
    fast = tts.synthesize(text, rate=350)
    assert len(slow) > len(normal) > len(fast)
    assert len(slow) > 2 * len(fast)


def test_available_voices_all_work(tts: SpeechSynthesizer) -> None:
    voices = available_voices()
    assert voices == tts.available_voices()
    assert {"en", "en-us", "en+f3", "en-us+m3"} <= set(voices)
    assert len(voices) == len(set(voices))
    digests = set()
    for voice in voices:
        # "cars" because accents differ on the r: en-us and en-us-nyc say "seven" identically.
        wave = tts.synthesize("seven cars", voice=voice)
        assert rms(wave) > MIN_RMS, voice
        digests.add(digest(wave))
    # Every name is a distinct voice, not a silent fallback to the default.
    assert len(digests) == len(voices)


def test_instances_are_independent(tts: SpeechSynthesizer) -> None:
    """Two instances in one process, interleaved and in threads, match a single instance."""
    cases = [("seven", v, r, 50, 50) for v in ("en", "en-us+f2", "en+m5") for r in (120, 260)]
    expected = [digest(tts.synthesize(*c)) for c in cases]
    with SpeechSynthesizer() as other:
        interleaved = [
            digest((other if i % 2 else tts).synthesize(*c)) for i, c in enumerate(cases)
        ]
    assert interleaved == expected

    results: dict[int, list[str]] = {}

    def work(k: int) -> None:
        with SpeechSynthesizer() as synth:
            results[k] = [digest(synth.synthesize(*c)) for c in cases[k::2]]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == expected[0::2] and results[1] == expected[1::2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"voice": "en+nosuchvariant"},
        {"voice": "no-such-voice"},
        {"voice": ""},
        {"rate": 10},
        {"rate": 1000},
        {"pitch": 101},
        {"range_": -1},
        {"text": "sev\x00en"},
    ],
)
def test_bad_arguments_raise(tts: SpeechSynthesizer, kwargs: dict) -> None:
    call = {"text": "seven", **kwargs}
    with pytest.raises(SpeechInputError) as info:
        tts.synthesize(**call)
    # Usable both as a plain ValueError and under the CLI's exit-status-2 contract.
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserInputError)


def test_close_is_idempotent_and_final() -> None:
    pytest.importorskip("espeakng_loader", reason="needs the espeakng-loader package")
    synth = SpeechSynthesizer()
    assert rms(synth.synthesize("seven")) > MIN_RMS
    synth.close()
    synth.close()
    with pytest.raises(RuntimeError, match="closed"):
        synth.synthesize("seven")


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="pip install espeakng-loader"):
        SpeechSynthesizer()
    with pytest.raises(RuntimeError, match="pip install espeakng-loader"):
        available_voices()
