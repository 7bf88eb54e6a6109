"""The Free Spoken Digit Dataset path (issue 20): WAV reading and its errors, the two
protocols, the spectrogram step features (against a numpy oracle), their normalisation, the
valid-step classifier (against each sequence run alone), and the pipeline on a small
synthetic recordings folder; the real data set when it is present."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import tdcompress as tdc
from tdcompress.config import load_config
from tdcompress.data.speech import (
    BINS,
    FRAMES_PER_STEP,
    HOP,
    MAX_STEPS,
    N_FFT,
    SPEAKERS,
    fsdd_split,
    load_fsdd,
    log_spectrogram_steps,
    read_fsdd,
    read_wav,
)
from tdcompress.models import build_model
from tdcompress.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]


def _write_wav(path: Path, samples: np.ndarray, rate: int = 8000, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def _fake_fsdd(root: Path, speakers=("george", "lucas"), per_digit: int = 6, seed: int = 0):
    """A recordings folder of tones whose pitch encodes the digit (learnable), lengths
    1,100-6,000 samples."""
    rng = np.random.default_rng(seed)
    rec = root / "free-spoken-digit-dataset" / "recordings"
    rec.mkdir(parents=True)
    for sp in speakers:
        for d in range(10):
            for i in range(per_digit):
                n = int(rng.integers(1100, 6000))
                t = np.arange(n) / 8000
                x = 8000 * np.sin(2 * np.pi * (300 + 250 * d) * t) + 500 * rng.standard_normal(n)
                _write_wav(rec / f"{d}_{sp}_{i}.wav", x)
    return root


def test_read_wav_values_and_errors(tmp_path) -> None:
    x = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    _write_wav(tmp_path / "ok.wav", x)
    torch.testing.assert_close(read_wav(tmp_path / "ok.wav"), torch.from_numpy(x / 32768.0).float())
    _write_wav(tmp_path / "rate.wav", x, rate=16000)
    with pytest.raises(ValueError, match=r"rate\.wav: sample rate 16000 Hz, expected 8000"):
        read_wav(tmp_path / "rate.wav")
    _write_wav(tmp_path / "stereo.wav", np.repeat(x, 2), channels=2)
    with pytest.raises(ValueError, match=r"stereo\.wav: 2 channel"):
        read_wav(tmp_path / "stereo.wav")
    _write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(ValueError, match=r"empty\.wav: the recording is empty"):
        read_wav(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF1234WAVEjunkjunk")
    with pytest.raises(ValueError, match=r"junk\.wav: not a readable WAV"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError, match=r"nothere\.wav"):
        read_wav(tmp_path / "nothere.wav")


def test_read_fsdd_and_protocols(tmp_path) -> None:
    root = _fake_fsdd(tmp_path, per_digit=6)
    waves, digits, speakers, idx = read_fsdd(root)
    assert len(waves) == 120 and sorted(set(speakers)) == ["george", "lucas"]
    assert digits.bincount().tolist() == [12] * 10
    test = fsdd_split(speakers, idx, "official")
    assert test.sum() == 2 * 10 * 5 and bool((idx[test] < 5).all())
    held = fsdd_split(speakers, idx, "speaker", "lucas")
    assert held.sum() == 60 and all(s == "lucas" for s, h in zip(speakers, held) if h)
    with pytest.raises(ValueError, match="protocol must be one of"):
        fsdd_split(speakers, idx, "random")
    with pytest.raises(ValueError, match="speaker must be one of"):
        fsdd_split(speakers, idx, "speaker", "bob")
    with pytest.raises(ValueError, match="holds out no speaker"):
        fsdd_split(speakers, idx, "official", "george")
    (root / "free-spoken-digit-dataset" / "recordings" / "notes.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"notes\.wav: file name does not follow"):
        read_fsdd(root)
    with pytest.raises(FileNotFoundError, match="free-spoken-digit-dataset"):
        read_fsdd(tmp_path / "elsewhere")


def _oracle_steps(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Log power spectra of one recording by numpy's rfft, grouped into steps."""
    frames = 1 + (len(x) - N_FFT) // HOP
    n = np.arange(N_FFT)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)  # periodic Hann (torch's default)
    spec = np.stack([np.fft.rfft(x[i * HOP : i * HOP + N_FFT] * window) for i in range(frames)])
    logp = np.log(np.abs(spec[:, :BINS]) ** 2 + 1e-10)
    count = min(frames // FRAMES_PER_STEP, MAX_STEPS)
    out = np.zeros((MAX_STEPS, FRAMES_PER_STEP * BINS))
    use = logp[: count * FRAMES_PER_STEP].reshape(count, -1)
    out[:count] = use
    return out, count


def test_log_spectrogram_steps_match_numpy_oracle() -> None:
    rng = np.random.default_rng(1)
    lengths = [704, 1148, 3358, 9000]  # one step, one, a few, past MAX_STEPS (truncated)
    waves = [rng.standard_normal(n).astype(np.float64) * 0.1 for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], True)
    steps, counts = log_spectrogram_steps(padded.double(), torch.tensor(lengths), chunk=3)
    for k, w in enumerate(waves):
        ref, count = _oracle_steps(w)
        assert int(counts[k]) == count
        np.testing.assert_allclose(steps[k].numpy(), ref, rtol=1e-5, atol=1e-4)  # (log domain)
    assert counts.tolist() == [1, 1, 6, 16]
    with pytest.raises(ValueError, match="needs >= 704 samples"):
        log_spectrogram_steps(padded[:, :703], torch.tensor([703, 703, 703, 703]))


def test_load_fsdd_normalised_with_training_statistics(tmp_path) -> None:
    root = _fake_fsdd(tmp_path, per_digit=6)
    xtr, ytr, xte, yte = load_fsdd(root, "speaker", "george")
    assert xtr.shape == (60, MAX_STEPS, FRAMES_PER_STEP * BINS + 1) and xte.shape[0] == 60
    valid = xtr[..., -1] > 0
    assert set(xtr[..., -1].unique().tolist()) <= {0.0, 1.0}
    frames = xtr[..., :-1][valid].reshape(-1, BINS).double()  # every valid training frame
    torch.testing.assert_close(
        frames.mean(0), torch.zeros(BINS, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        frames.std(0), torch.ones(BINS, dtype=torch.float64), atol=1e-3, rtol=0
    )
    assert float(xtr[..., :-1][~valid].abs().max()) == 0.0  # padding stays zero
    assert float(xte[..., :-1][xte[..., -1] == 0].abs().max()) == 0.0
    # valid steps come first
    v = xtr[..., -1]
    assert bool((v[:, 1:] <= v[:, :-1]).all())


@pytest.mark.parametrize("factorized", [False, True])
def test_classifier_reads_each_sequences_last_valid_step(factorized) -> None:
    torch.manual_seed(0)
    model = build_model("lstm_speech", input_size=24, hidden_size=8).double().eval()
    if factorized:  # the TT-LSTM that decompose builds: same rule
        p = tdc.plan(model, "tt", ranks=3, lstm=True, input_shape=(1, 5, 25))
        model, _ = tdc.decompose(model, p)
        model = model.double().eval()
    lengths = [5, 1, 3]
    x = torch.randn(3, 5, 25, dtype=torch.float64)
    for k, n in enumerate(lengths):
        x[k, :, -1] = (torch.arange(5) < n).double()
        x[k, n:, :-1] = torch.randn(5 - n, 24, dtype=torch.float64)  # garbage after the end
    out = model(x)
    for k, n in enumerate(lengths):  # oracle: the sequence alone, unpadded
        ref = model(x[k : k + 1, :n])
        torch.testing.assert_close(out[k : k + 1], ref)
    with pytest.raises(ValueError, match="expected 25"):
        model(torch.randn(2, 5, 24, dtype=torch.float64))


def test_config_checks_protocol_and_speaker(tmp_path) -> None:
    cfg = REPO / "configs" / "fsdd" / "dense.yaml"
    assert load_config(cfg, ["data.protocol=speaker", "data.speaker=theo"]).data.speaker == "theo"
    with pytest.raises(ValueError, match="data.speaker must be one of"):
        load_config(cfg, ["data.protocol=speaker"])
    with pytest.raises(ValueError, match="data.protocol must be one of"):
        load_config(cfg, ["data.protocol=random"])
    with pytest.raises(ValueError, match="data.speaker must be null"):
        load_config(cfg, ["data.speaker=theo"])
    with pytest.raises(ValueError, match="data.augment must be false"):
        load_config(cfg, ["data.augment=true"])
    mnist = REPO / "configs" / "mnist_lenet5_tt_small.yaml"
    with pytest.raises(ValueError, match="protocols and speakers are for data.dataset fsdd"):
        load_config(mnist, ["data.protocol=speaker"])


def test_every_fsdd_config_loads() -> None:
    for p in sorted((REPO / "configs" / "fsdd").glob("*.yaml")):
        cfg = load_config(p)
        assert cfg.data.dataset == "fsdd" and cfg.model.name == "lstm_speech", p


def test_pipeline_on_synthetic_recordings(tmp_path) -> None:
    root = _fake_fsdd(tmp_path / "data", per_digit=6)
    sets = [
        "dense.epochs=3",
        "admm.epochs=1",
        "admm.every_steps=2",
        "finetune.epochs=1",
        "runtime.progress=false",
        f"runtime.out_dir={tmp_path / 'run'}",
        f"data.root={root}",
        "runtime.dense_checkpoint=null",
        "data.batch_size=16",
    ]
    cfg = load_config(REPO / "configs" / "fsdd" / "tt_93x.yaml", sets)
    done = Pipeline(cfg).run()
    ev = done["evaluate"]
    assert ev["format"] == "tt" and ev["layers_ratio"] > 50
    assert ev["finetuned_acc"] is not None and ev["dense_acc"] > 0.3  # tones are learnable
    assert done["decompose"]["errors"]["lstm.l0"] < 1.0


@pytest.mark.data
def test_real_fsdd_protocols(data_root) -> None:
    if not (data_root / "free-spoken-digit-dataset").is_dir():
        pytest.skip(f"free-spoken-digit-dataset not under {data_root}")
    xtr, ytr, xte, yte = load_fsdd(data_root)
    assert xtr.shape == (2700, MAX_STEPS, 1025) and xte.shape == (300, MAX_STEPS, 1025)
    assert ytr.bincount().tolist() == [270] * 10 and yte.bincount().tolist() == [30] * 10
    xtr, _, xte, _ = load_fsdd(data_root, "speaker", SPEAKERS[0])
    assert len(xtr) == 2500 and len(xte) == 500
