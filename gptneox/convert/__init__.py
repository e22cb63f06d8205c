"""convert: checkpoints between formats, streamed, atomic and verified (convert_weights.py is the command line).

    source.py  reading a checkpoint to convert: its kind, and its tensors one at a time
    hf.py      into the Hugging Face layout (from HF, gpt-neox, or quantized) and out to gpt-neox's; verification
    neox.py    gpt-neox's own format: its args, tensor-parallel split and merge
"""

from .hf import (CONVERTER, LOGITS_MAX_PARAMS, check_destination, conversion_output, convert_hf, convert_neox,
                 export_neox)
from .source import HFCheckpoint, source_kind

__all__ = ["CONVERTER", "LOGITS_MAX_PARAMS", "check_destination", "conversion_output", "convert_hf", "convert_neox",
           "export_neox", "HFCheckpoint", "source_kind"]
