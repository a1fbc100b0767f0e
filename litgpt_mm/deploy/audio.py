"""Speech input: load a recording with ffmpeg, keep the first 10 seconds of speech and transcribe it with WhisperX.

The transcript goes into the text prompt (`prompt_with_speech`). WhisperX (the `audio` extra) is imported only when
audio is loaded or a model is built.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
AUDIO_FORMATS = "wav, flac, mp3, ogg, m4a, webm or any other format ffmpeg can decode"


@dataclass(frozen=True)
class Transcript:
    """What `SpeechToText.transcribe` heard.

    Attributes:
        text: the transcript of the kept speech ("" when no speech was found).
        speech_seconds: seconds of audio given to the model, from the start of speech (at most `max_speech_seconds`).
        clipped: the speech went on past `max_speech_seconds` and was cut.
        notice: a message for the user when something was dropped or nothing was heard, else `None`.
    """

    text: str
    speech_seconds: float
    clipped: bool
    notice: str | None = None


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to a float32 mono waveform in [-1, 1], resampled to `sample_rate`.

    Uses `whisperx.load_audio` (the ffmpeg command line), which downmixes stereo and reads any format ffmpeg knows.
    Without an `ffmpeg` executable it falls back to PyAV (faster-whisper's decoder, which bundles FFmpeg).

    Args:
        path: the audio file.
        sample_rate: the sample rate to resample to.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not audio that ffmpeg can decode, or holds no samples.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}. Check the path and pass a recording ({AUDIO_FORMATS}).")
    if not path.is_file():
        raise ValueError(f"{path} is not a file. Pass an audio recording ({AUDIO_FORMATS}).")
    try:
        if _ffmpeg_available():
            import whisperx

            audio = whisperx.load_audio(str(path), sr=sample_rate)
        else:
            from faster_whisper.audio import decode_audio

            audio = decode_audio(str(path), sampling_rate=sample_rate)
    except Exception as e:  # ffmpeg's CalledProcessError (wrapped in RuntimeError by whisperx) or a PyAV error
        raise ValueError(
            f"could not decode {path} as audio ({_last_line(e)}). Pass a speech recording ({AUDIO_FORMATS})."
        ) from None
    if audio.size == 0:
        raise ValueError(f"{path} contains no audio samples. Pass a speech recording ({AUDIO_FORMATS}).")
    return np.ascontiguousarray(audio, dtype=np.float32)


class SpeechToText:
    """WhisperX transcription of the first `max_speech_seconds` of speech in a recording.

    Voice activity detection (VAD) finds where speech starts; the audio is cut to at most `max_speech_seconds` from
    there (and to the end of the last speech) and only that part is transcribed. The model is loaded on first use.

    Args:
        model: a Whisper size name (`tiny`, `base`, `small`, `medium`, `large-v3`, ...; downloaded from the Hugging Face
            Hub on first use) or a local CTranslate2 Whisper directory (with `tokenizer.json`, for offline use).
        device: `cuda` or `cpu` (default: CUDA when available).
        compute_type: CTranslate2 compute type (default: `float16` on CUDA, `int8` on CPU).
        language: language code of the speech; `None` detects it per recording (multilingual models only).
        max_speech_seconds: how much speech to keep, counted from where speech starts.
        batch_size: VAD segments decoded together.
        vad_method: WhisperX's VAD. `pyannote` ships its weights inside the whisperx package and works offline;
            `silero` downloads its model through `torch.hub` the first time.
    """

    def __init__(
        self,
        model: str = "large-v3",
        device: str | None = None,
        compute_type: str | None = None,
        language: str | None = "en",
        max_speech_seconds: float = 10.0,
        batch_size: int = 8,
        vad_method: str = "pyannote",
    ) -> None:
        if max_speech_seconds <= 0:
            raise ValueError(f"max_speech_seconds must be positive, got {max_speech_seconds}")
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = str(model)
        self.device = device
        self.compute_type = compute_type or ("float16" if device == "cuda" else "int8")
        self.language = language
        self.max_speech_seconds = max_speech_seconds
        self.batch_size = batch_size
        self.vad_method = vad_method
        self._pipeline = None

    @property
    def pipeline(self):
        """The `whisperx` `FasterWhisperPipeline` (Whisper model and VAD), loaded on first access."""
        if self._pipeline is None:
            import whisperx

            self._pipeline = whisperx.load_model(
                self.model,
                self.device,
                compute_type=self.compute_type,
                language=self.language,
                vad_method=self.vad_method,
            )
        return self._pipeline

    def speech_spans(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """The `(start, end)` seconds of the speech that the pipeline's VAD finds in 16 kHz mono `audio`."""
        from whisperx.vads import Pyannote, Vad

        vad = self.pipeline.vad_model
        # like `FasterWhisperPipeline.transcribe`: a VAD that is not a whisperx `Vad` is treated as pyannote
        helper = vad if isinstance(vad, Vad) else Pyannote
        params = getattr(self.pipeline, "_vad_params", {"vad_onset": 0.5, "vad_offset": 0.363})
        scores = vad({"waveform": helper.preprocess_audio(audio), "sample_rate": SAMPLE_RATE})
        chunks = helper.merge_chunks(scores, 30, onset=params["vad_onset"], offset=params["vad_offset"])
        return [(float(start), float(end)) for chunk in chunks for start, end in chunk["segments"]]

    def transcribe(self, audio: str | Path | np.ndarray) -> Transcript:
        """Transcribe the first `max_speech_seconds` of speech.

        Args:
            audio: an audio file (any format and sample rate ffmpeg reads, mono or stereo) or a float mono waveform
                at 16 kHz.

        Returns:
            The `Transcript`. Silence or noise gives empty text and a "no speech detected" notice, not an error.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not audio, or the array is not a 1-D waveform.
        """
        if isinstance(audio, np.ndarray):
            name = "the audio"
            if audio.ndim != 1:
                raise ValueError(f"expected a 1-D mono waveform at {SAMPLE_RATE} Hz, got shape {audio.shape}")
            waveform = np.ascontiguousarray(audio, dtype=np.float32)
        else:
            name = str(audio)
            waveform = load_audio(audio)

        spans = self.speech_spans(waveform) if waveform.size else []
        if not spans:
            return Transcript("", 0.0, False, f"no speech detected in {name}")
        start, speech_end = spans[0][0], spans[-1][1]
        end = min(start + self.max_speech_seconds, speech_end)
        clipped = speech_end > start + self.max_speech_seconds
        clip = waveform[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)]
        speech_seconds = len(clip) / SAMPLE_RATE

        result = self.pipeline.transcribe(clip, batch_size=self.batch_size)
        text = " ".join(segment["text"].strip() for segment in result["segments"]).strip()
        if not text:
            notice = f"no speech recognised in {name}"
        elif clipped:
            notice = (
                f"only the first {self.max_speech_seconds:g} s of speech in {name} were used "
                f"(it lasts {speech_end - start:.1f} s)"
            )
        else:
            notice = None
        return Transcript(text, speech_seconds, clipped, notice)


def prompt_with_speech(prompt: str, transcript: Transcript) -> str:
    """Put the transcript into the text prompt.

    The transcript goes on its own line after the prompt, as `Speech: <text>`; with an empty prompt the transcript
    alone is the prompt, and an empty transcript leaves the prompt unchanged. For example
    `prompt_with_speech("What is in the image?", Transcript("Is it a cat?", 1.2, False))` gives
    `"What is in the image?\\nSpeech: Is it a cat?"`.

    Args:
        prompt: the typed prompt (may be empty).
        transcript: what `SpeechToText.transcribe` returned.
    """
    text = transcript.text.strip()
    if not text:
        return prompt
    if not prompt.strip():
        return text
    return f"{prompt.rstrip()}\nSpeech: {text}"


def _quiet_whisperx() -> None:
    """Silence what WhisperX's dependencies print on every load and that a user cannot act on: pyannote's torchcodec
    warning without FFmpeg's shared libraries (we decode with ffmpeg or PyAV ourselves), Lightning's note that it
    upgraded the VAD checkpoint in memory, and WhisperX's INFO lines."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"\s*torchcodec is not installed correctly", category=UserWarning)
    logging.getLogger("lightning.pytorch.utilities.migration.utils").setLevel(logging.WARNING)
    logging.getLogger("whisperx").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("whisperx."):
            logging.getLogger(name).setLevel(logging.WARNING)


_quiet_whisperx()


def _ffmpeg_available() -> bool:
    return shutil.which("ffmpeg") is not None


def _last_line(error: BaseException) -> str:
    """The last non-empty line of an error message (ffmpeg puts the reason at the end of its stderr)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
