"""Speech input on the bundled clips: ffmpeg loading, VAD, the 10 s cut, WhisperX with a tiny random model."""

import json
import re
import wave

import numpy as np
import pytest
from conftest import DATA, require_tool, run_python

import litgpt_mm.deploy.tiny_whisper
from litgpt_mm.deploy import audio as audio_module
from litgpt_mm.deploy.audio import SAMPLE_RATE, SpeechToText, Transcript, load_audio, prompt_with_speech

build_tiny_whisper = litgpt_mm.deploy.tiny_whisper.build_tiny_whisper

pytest.importorskip("whisperx")

AUDIO = DATA / "audio"
JFK = AUDIO / "jfk.flac"  # 11.0 s, 44.1 kHz stereo; speech from about 0.3 s to the end
SILENCE = AUDIO / "generated_silence_5s_16k.wav"
NOISE = AUDIO / "generated_white_noise_5s_16k.wav"
STEREO = AUDIO / "stereo_diarization.wav"  # 5.0 s, 16 kHz, a different sentence in each channel
MP3 = AUDIO / "multilingual.mp3"  # 59.9 s, 24 kHz mono


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-ct2")


@pytest.fixture(scope="module")
def stt(tiny_whisper) -> SpeechToText:
    return SpeechToText(str(tiny_whisper), device="cpu", compute_type="int8")


@pytest.fixture
def model_inputs(stt, monkeypatch) -> dict[str, list[int]]:
    """Record the audio given to `pipeline.transcribe` and each VAD segment fed to the model's mel features."""
    pipeline = stt.pipeline
    seen = {"transcribe": [], "segments": []}
    transcribe, preprocess = pipeline.transcribe, pipeline.preprocess

    def spy_transcribe(audio, *args, **kwargs):
        seen["transcribe"].append(len(audio))
        return transcribe(audio, *args, **kwargs)

    def spy_preprocess(inputs):
        seen["segments"].append(len(inputs["inputs"]))
        return preprocess(inputs)

    monkeypatch.setattr(pipeline, "transcribe", spy_transcribe)
    monkeypatch.setattr(pipeline, "preprocess", spy_preprocess)
    return seen


def test_tiny_whisper_is_a_complete_offline_model(tiny_whisper):
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer

    files = {p.name for p in tiny_whisper.iterdir()}
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json", "preprocessor_config.json"} <= files
    model = WhisperModel(str(tiny_whisper), device="cpu", compute_type="int8")  # reads tokenizer.json, no Hub call
    assert model.feat_kwargs["feature_size"] == 80 and model.model.n_mels == 80
    # CTranslate2 calls a Whisper multilingual only from 51865 tokens on, so this small model is English-only.
    assert not model.model.is_multilingual
    vocabulary = json.loads((tiny_whisper / "vocabulary.json").read_text())
    assert vocabulary == [model.hf_tokenizer.id_to_token(i) for i in range(model.hf_tokenizer.get_vocab_size())]

    tokenizer = Tokenizer(model.hf_tokenizer, multilingual=False)
    specials = [tokenizer.eot, tokenizer.sot, tokenizer.translate, tokenizer.transcribe, tokenizer.sot_lm]
    specials += [tokenizer.sot_prev, tokenizer.no_speech, tokenizer.no_timestamps]
    assert None not in specials and specials == sorted(specials) and tokenizer.sot == tokenizer.eot + 1
    assert all(model.hf_tokenizer.token_to_id(f"<|{code}|>") is not None for code in _LANGUAGE_CODES)
    assert vocabulary[tokenizer.timestamp_begin] == "<|0.00|>" and vocabulary[-1] == "<|30.00|>"
    text = " ask not what your country can do for you"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < tokenizer.eot


def test_tiny_whisper_build_is_deterministic(tiny_whisper, tmp_path):
    again = build_tiny_whisper(tmp_path / "again")
    for name in ("model.bin", "tokenizer.json", "config.json", "vocabulary.json"):
        assert (again / name).read_bytes() == (tiny_whisper / name).read_bytes(), name


def test_load_audio_resamples_and_downmixes():
    jfk = load_audio(JFK)
    assert jfk.dtype == np.float32 and jfk.ndim == 1 and len(jfk) == 11 * SAMPLE_RATE  # 44.1 kHz stereo -> 16 kHz
    assert 0.1 < np.abs(jfk).max() <= 1.0
    assert len(load_audio(JFK, sample_rate=8000)) == 11 * 8000
    assert abs(len(load_audio(MP3)) / SAMPLE_RATE - 59.9) < 0.1  # 24 kHz mp3

    with wave.open(str(STEREO)) as f:  # 16-bit PCM, 2 channels
        assert (f.getnchannels(), f.getframerate()) == (2, SAMPLE_RATE)
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16).reshape(-1, 2) / 32768
    mono = load_audio(STEREO)
    assert mono.shape == (len(pcm),)
    np.testing.assert_allclose(mono, pcm.mean(axis=1), atol=2 / 32768)  # the average of both channels
    assert np.abs(mono - pcm[:, 0]).max() > 0.1  # not just the left channel


def test_load_audio_without_ffmpeg_uses_pyav(monkeypatch):
    require_tool("ffmpeg", "ffmpeg")
    with_ffmpeg = load_audio(JFK)
    monkeypatch.setattr(audio_module, "_ffmpeg_available", lambda: False)
    without = load_audio(JFK)
    assert without.dtype == np.float32 and without.shape == with_ffmpeg.shape
    np.testing.assert_allclose(without, with_ffmpeg, atol=1e-3)


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "pyav"])
def test_bad_audio_files_raise_one_clear_error(tmp_path, monkeypatch, ffmpeg):
    if ffmpeg:
        require_tool("ffmpeg", "ffmpeg")
    monkeypatch.setattr(audio_module, "_ffmpeg_available", lambda: ffmpeg)
    text = tmp_path / "speech.wav"
    text.write_text("This is a text file, not a recording.\n")
    with pytest.raises(ValueError, match="could not decode .*speech.wav as audio") as error:
        load_audio(text)
    assert "Invalid data" in str(error.value) and "Pass a speech recording" in str(error.value)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no ffmpeg traceback chained

    empty = tmp_path / "empty.mp3"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp3"):
        load_audio(empty)
    with pytest.raises(FileNotFoundError, match="audio file not found: .*missing.flac"):
        load_audio(tmp_path / "missing.flac")
    with pytest.raises(ValueError, match="is not a file"):
        load_audio(tmp_path)


def test_defaults_and_lazy_loading():
    stt = SpeechToText(device="cpu")
    assert (stt.model, stt.compute_type, stt.language, stt.max_speech_seconds) == ("large-v3", "int8", "en", 10.0)
    assert stt.vad_method == "pyannote" and stt._pipeline is None  # nothing loaded (or downloaded) yet
    assert SpeechToText(device="cuda").compute_type == "float16"
    assert SpeechToText(device="cpu", compute_type="float32").compute_type == "float32"
    with pytest.raises(ValueError, match="max_speech_seconds"):
        SpeechToText(max_speech_seconds=0)


def test_import_does_not_load_whisperx():
    code = "import sys, litgpt_mm.deploy.audio; assert not {'whisperx', 'torch', 'faster_whisper'} & set(sys.modules)"
    proc = run_python(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_jfk_keeps_only_the_first_10_seconds_of_speech(stt, model_inputs):
    spans = stt.speech_spans(load_audio(JFK))
    start, end = spans[0][0], spans[-1][1]
    assert 0.1 < start < 1.0 and end > start + 10  # 10.7 s of speech in the 11 s clip

    transcript = stt.transcribe(JFK)
    assert isinstance(transcript, Transcript) and transcript.clipped
    assert transcript.speech_seconds == pytest.approx(10.0, abs=1e-3)
    assert isinstance(transcript.text, str) and transcript.text  # a random model: the words mean nothing
    assert "only the first 10 s of speech" in transcript.notice and str(JFK) in transcript.notice
    # what WhisperX got: one 10 s clip starting at the speech, and VAD segments that are no longer
    assert model_inputs["transcribe"] == [10 * SAMPLE_RATE]
    assert model_inputs["segments"] and max(model_inputs["segments"]) <= 10 * SAMPLE_RATE
    assert stt.transcribe(JFK) == transcript  # deterministic


def test_array_input_matches_file_input(stt):
    from_file = stt.transcribe(JFK)
    from_array = stt.transcribe(load_audio(JFK))
    assert (from_array.text, from_array.speech_seconds, from_array.clipped) == (
        from_file.text,
        from_file.speech_seconds,
        from_file.clipped,
    )
    with pytest.raises(ValueError, match="1-D mono waveform"):
        stt.transcribe(np.zeros((2, SAMPLE_RATE), dtype=np.float32))
    empty = stt.transcribe(np.zeros(0, dtype=np.float32))
    assert empty == Transcript("", 0.0, False, "no speech detected in the audio")


def test_audio_after_the_10_seconds_never_reaches_the_model(stt, model_inputs):
    jfk, other_speech = load_audio(JFK), load_audio(MP3)[: 20 * SAMPLE_RATE]
    start = stt.speech_spans(jfk)[0][0]
    first_10_s = jfk[: int((start + 10) * SAMPLE_RATE)]
    longer = stt.transcribe(np.concatenate([first_10_s, other_speech]))  # 30 s of speech
    assert longer.clipped and longer.speech_seconds == pytest.approx(10.0, abs=1e-3)
    assert longer.text == stt.transcribe(JFK).text  # the extra 20 s of speech changed nothing
    assert 29 < float(re.search(r"it lasts ([\d.]+) s", longer.notice).group(1)) <= 30
    # the tiny model's random transcripts do depend on the audio: other speech gives other text
    assert stt.transcribe(other_speech).text != longer.text != stt.transcribe(STEREO).text


def test_silence_gives_empty_text_and_a_notice(stt, model_inputs):
    transcript = stt.transcribe(SILENCE)
    assert transcript == Transcript("", 0.0, False, f"no speech detected in {SILENCE}")
    assert model_inputs["transcribe"] == []  # the model was not run


def test_white_noise_is_not_taken_for_speech(stt, model_inputs):
    # The pyannote VAD bundled with whisperx finds no speech in this -30 dBFS white noise (checked: no segment at all),
    # so noise is handled like silence and the model is never run on it.
    assert stt.speech_spans(load_audio(NOISE)) == []
    transcript = stt.transcribe(NOISE)
    assert transcript == Transcript("", 0.0, False, f"no speech detected in {NOISE}")
    assert model_inputs["transcribe"] == []


def test_short_stereo_speech_is_not_clipped(stt, model_inputs):
    transcript = stt.transcribe(STEREO)
    assert not transcript.clipped and transcript.notice is None and transcript.text
    assert 4.5 < transcript.speech_seconds < 5.0  # all of the 5 s clip after the speech starts
    assert model_inputs["transcribe"] == [round(transcript.speech_seconds * SAMPLE_RATE)]


def test_long_mp3_is_cut_to_10_seconds(stt, model_inputs):
    transcript = stt.transcribe(MP3)
    assert transcript.clipped and transcript.speech_seconds == pytest.approx(10.0, abs=1e-3) and transcript.text
    assert "(it lasts 59.9 s)" in transcript.notice
    assert model_inputs["transcribe"] == [10 * SAMPLE_RATE] and max(model_inputs["segments"]) <= 10 * SAMPLE_RATE


def test_max_speech_seconds_is_honoured(stt, model_inputs, monkeypatch):
    monkeypatch.setattr(stt, "max_speech_seconds", 3.0)
    transcript = stt.transcribe(STEREO)
    assert transcript.clipped and transcript.speech_seconds == pytest.approx(3.0, abs=1e-3)
    assert "only the first 3 s of speech" in transcript.notice
    assert model_inputs["transcribe"] == [3 * SAMPLE_RATE]


def test_transcribe_reports_bad_files(stt, tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(ValueError, match="could not decode .*notes.wav"):
        stt.transcribe(text)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        stt.transcribe(tmp_path / "missing.wav")


def test_prompt_with_speech():
    heard = Transcript("Is it a cat?", 1.5, False)
    assert prompt_with_speech("What is in the image?", heard) == "What is in the image?\nSpeech: Is it a cat?"
    assert prompt_with_speech("Describe it.  \n", heard) == "Describe it.\nSpeech: Is it a cat?"
    assert prompt_with_speech("", heard) == "Is it a cat?"
    assert prompt_with_speech("  ", Transcript("  Is it a cat? ", 1.5, False)) == "Is it a cat?"
    nothing = Transcript("", 0.0, False, "no speech detected in x.wav")
    assert prompt_with_speech("What is in the image?", nothing) == "What is in the image?"
    assert prompt_with_speech("", nothing) == ""
