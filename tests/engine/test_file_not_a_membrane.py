"""Files that are no membrane at all are refused by name (SPMFileError naming the file and the
problem): unreadable bytes, pickled checkpoints (never unpickled), missing or empty files, LoRAs
without a layer membranes adapt."""

import pickle
import random

import pytest
from file_helpers import RESNET, TEXT_ENCODER, expect_file_error, lora_pair, write

from spm_core.errors import SPMError, SPMFileError


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    expect_file_error(path, "not a readable safetensors file")


def test_header_only_garbage(tmp_path):
    path = tmp_path / "bad_header.safetensors"
    header = b'{"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16'
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    expect_file_error(path, "not a readable safetensors file")


class _Payload:
    """Unpickling this creates the marker file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_works(tmp_path):
    """Control: the payload really runs code when unpickled, so the refusal tests mean something."""
    marker = tmp_path / "control_marker"
    pickle.loads(pickle.dumps(_Payload(str(marker)))).close()
    assert marker.exists()


@pytest.mark.parametrize("file_name", ["evil.pt", "evil.ckpt", "evil.pth", "evil.bin", "evil.pkl", "EVIL.CKPT"])
def test_pickled_checkpoint_refused_without_reading(tmp_path, file_name):
    marker = tmp_path / "pwned"
    path = tmp_path / file_name
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    message = expect_file_error(path, "pickled", "convert", "safetensors")
    assert "save_file" in message  # says how to convert
    assert not marker.exists()


def test_pickled_checkpoint_refused_even_if_missing(tmp_path):
    expect_file_error(tmp_path / "absent.ckpt", "pickled")


def test_pickle_renamed_to_safetensors_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "renamed.safetensors"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    expect_file_error(path, "not a readable safetensors file")
    assert not marker.exists()


def test_missing_file(tmp_path):
    expect_file_error(tmp_path / "nowhere.safetensors", "not found")


def test_directory_is_not_a_file(tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    expect_file_error(folder, "not found")


def test_empty_safetensors(tmp_path):
    path = write(tmp_path / "empty.safetensors", {}, {"prompts": "snoopy"})
    expect_file_error(path, "no tensors")


def test_non_spm_lora_resnet_only(tmp_path):
    tensors = {**lora_pair(RESNET), **lora_pair(RESNET.replace("conv1", "conv2"))}
    path = write(tmp_path / "resnet_lora.safetensors", tensors)
    expect_file_error(path, "not an SPM membrane", RESNET)


def test_non_spm_lora_text_encoder_only(tmp_path):
    path = write(tmp_path / "te_lora.safetensors", lora_pair(TEXT_ENCODER))
    expect_file_error(path, "not an SPM membrane", TEXT_ENCODER)


def test_file_errors_are_value_errors_for_the_node():
    error = SPMFileError("/models/spm/x.safetensors", "broken")
    assert isinstance(error, SPMError) and isinstance(error, ValueError)
    assert str(error) == "/models/spm/x.safetensors: broken"
