"""The Free Spoken Digit Dataset (FSDD): its WAV recordings, its two protocols and the
sequence features of the TT-LSTM experiments.

The recordings (``free-spoken-digit-dataset/recordings/{digit}_{speaker}_{index}.wav``,
8 kHz mono 16-bit) are read with Python's :mod:`wave`. Protocols:

- ``"official"``: recordings with index 0-4 are the test set, 5-49 the training set;
- ``"speaker"``: one speaker's 500 recordings are the test set, the other five speakers'
  the training set (leave-one-speaker-out; ``SPEAKERS`` lists the six folds).

Features, in the spirit of the paper's video LSTM (one large input per time step, so that
the input-to-hidden matrix dominates the LSTM): a log power spectrogram (``torch.stft``,
Hann window of 256 samples, hop 64, the 128 bins below Nyquist), normalised per bin with
training-set statistics, grouped into blocks of 8 consecutive frames: each time step is one
1,024-value input (64 ms of speech). Sequences are padded with zeros to ``MAX_STEPS`` steps
(longer recordings, 0.6% of them, keep their first ``MAX_STEPS``) and carry one more
channel, 1 on valid steps and 0 on padding, from which the classifier reads each
sequence's length (:class:`~tdcompress.models.LSTMClassifier` with ``mask_channel``; the
model ``lstm_speech``).
"""

from __future__ import annotations

import re
import wave
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FSDD_FOLDER",
    "SPEAKERS",
    "PROTOCOLS",
    "SAMPLE_RATE",
    "N_FFT",
    "HOP",
    "BINS",
    "FRAMES_PER_STEP",
    "MAX_STEPS",
    "read_wav",
    "read_fsdd",
    "fsdd_split",
    "log_spectrogram_steps",
    "load_fsdd",
]

FSDD_FOLDER = "free-spoken-digit-dataset"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
PROTOCOLS = ("official", "speaker")
SAMPLE_RATE = 8000
N_FFT = 256
HOP = 64
BINS = N_FFT // 2  # the bins below Nyquist (the Nyquist bin is dropped: 1,024 = 8 x 128)
FRAMES_PER_STEP = 8
MAX_STEPS = 16
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def read_wav(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """The samples of a mono 16-bit PCM WAV file as float32 in [-1, 1).

    Raises ValueError naming the file for an unreadable file, another sample rate, more
    than one channel, another sample width, or no samples; FileNotFoundError if absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recording not found")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError, RuntimeError, OSError) as e:  # (malformed chunks)
        raise ValueError(f"{path}: not a readable WAV file ({e})") from None
    if rate != sample_rate:
        raise ValueError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
    if channels != 1 or width != 2:
        raise ValueError(
            f"{path}: {channels} channel(s) of {8 * width}-bit samples, expected mono 16-bit PCM"
        )
    if len(frames) < 2:
        raise ValueError(f"{path}: the recording is empty (no samples)")
    data = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return torch.from_numpy(data)


def read_fsdd(root: str | Path) -> tuple[list[torch.Tensor], torch.Tensor, list[str], torch.Tensor]:
    """Every recording under ``root/free-spoken-digit-dataset/recordings``, sorted by name:
    ``(waveforms, digits int64, speakers, indices int64)``."""
    folder = Path(root) / FSDD_FOLDER / "recordings"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: folder not found (the Free Spoken Digit Dataset's recordings/; "
            "a copy of the repository Jakobovski/free-spoken-digit-dataset belongs there)"
        )
    waves, digits, speakers, indices = [], [], [], []
    for p in sorted(folder.glob("*.wav")):
        m = _NAME.match(p.name)
        if m is None:
            raise ValueError(f"{p}: file name does not follow {{digit}}_{{speaker}}_{{index}}.wav")
        waves.append(read_wav(p))
        digits.append(int(m.group(1)))
        speakers.append(m.group(2))
        indices.append(int(m.group(3)))
    if not waves:
        raise FileNotFoundError(f"{folder}: no .wav recordings in the folder")
    return waves, torch.tensor(digits), speakers, torch.tensor(indices)


def fsdd_split(
    speakers: list[str], indices: torch.Tensor, protocol: str, speaker: str | None = None
) -> torch.Tensor:
    """A bool mask, True for the test recordings of ``protocol`` (see the module
    docstring); ``speaker`` names the held-out speaker of the ``"speaker"`` protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "official":
        if speaker is not None:
            raise ValueError(
                f"speaker={speaker!r} is given but protocol='official' holds out no speaker; "
                "use protocol='speaker' or speaker=None"
            )
        return indices < 5
    if speaker not in SPEAKERS:
        raise ValueError(
            f"speaker must be one of {SPEAKERS} for protocol='speaker', got {speaker!r}"
        )
    return torch.tensor([s == speaker for s in speakers])


def _pad(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(w) for w in waves])
    return torch.nn.utils.rnn.pad_sequence(waves, batch_first=True), lengths


def log_spectrogram_steps(
    waves: torch.Tensor, lengths: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps (N, MAX_STEPS, FRAMES_PER_STEP * BINS), step counts (N,))`` of the padded
    waveforms ``waves`` (N, L) with ``lengths`` (N,): log power spectra (not normalised)
    grouped into blocks of ``FRAMES_PER_STEP`` frames; steps past a recording's end are
    zero. A recording has ``floor(frames / FRAMES_PER_STEP)`` steps (at most ``MAX_STEPS``;
    recordings shorter than one step are refused), ``frames = 1 + (length - N_FFT) // HOP``.
    ``chunk`` recordings at a time (memory), each chunk one batched ``torch.stft``."""
    if waves.dim() != 2 or lengths.shape != (waves.shape[0],):
        raise ValueError(
            f"waves must be (N, L) and lengths (N,), got {tuple(waves.shape)} and "
            f"{tuple(lengths.shape)}"
        )
    shortest = N_FFT + (FRAMES_PER_STEP - 1) * HOP  # one step of whole frames
    if int(lengths.min()) < shortest:
        raise ValueError(
            f"every recording needs >= {shortest} samples (one step of {FRAMES_PER_STEP} "
            f"frames), got one of {int(lengths.min())}"
        )
    frames_needed = MAX_STEPS * FRAMES_PER_STEP
    need = N_FFT + (frames_needed - 1) * HOP
    if waves.shape[1] < need:
        waves = torch.nn.functional.pad(waves, (0, need - waves.shape[1]))
    waves = waves[:, :need]
    window = torch.hann_window(N_FFT)
    out = []
    for i in range(0, len(waves), chunk):
        spec = torch.stft(
            waves[i : i + chunk], N_FFT, HOP, window=window, center=False, return_complex=True
        )  # (n, N_FFT // 2 + 1, frames)
        power = spec[:, :BINS].abs().square()
        out.append(torch.log(power + 1e-10).transpose(1, 2))  # (n, frames, BINS)
    logspec = torch.cat(out)[:, :frames_needed]
    steps = logspec.reshape(len(waves), MAX_STEPS, FRAMES_PER_STEP * BINS)
    frames = 1 + (lengths - N_FFT) // HOP
    counts = (frames // FRAMES_PER_STEP).clamp(max=MAX_STEPS)
    valid = torch.arange(MAX_STEPS)[None, :] < counts[:, None]
    return steps * valid[..., None], counts


def load_fsdd(
    root: str | Path, protocol: str = "official", speaker: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``protocol``: x float32 (N, MAX_STEPS,
    FRAMES_PER_STEP * BINS + 1), normalised per frequency bin with the mean and standard
    deviation of the training recordings' valid frames; the last channel is 1 on valid
    steps, 0 on padding (whose features are 0)."""
    waves, digits, speakers, indices = read_fsdd(root)
    test = fsdd_split(speakers, indices, protocol, speaker)
    padded, lengths = _pad(waves)
    steps, counts = log_spectrogram_steps(padded, lengths)
    valid = torch.arange(MAX_STEPS)[None, :] < counts[:, None]  # (N, T)
    frames = steps.reshape(len(steps), MAX_STEPS, FRAMES_PER_STEP, BINS)
    train_frames = frames[~test][valid[~test]].reshape(-1, BINS).double()
    mean, std = train_frames.mean(0), train_frames.std(0).clamp_min(1e-6)
    frames = ((frames - mean.float()) / std.float()) * valid[..., None, None]
    x = torch.cat([frames.reshape(len(steps), MAX_STEPS, -1), valid[..., None].float()], 2)
    return x[~test], digits[~test], x[test], digits[test]
