"""goose-jax: route among an ocean of LoRA experts on a frozen T5 (PHATGOOSE) in JAX/Flax.

The public surface most users need::

    import goose_jax as gj
    cfg, params = gj.load_hf_t5(path)
    logits_BTV = gj.t5_logits(cfg, params, input_ids_BL, decoder_input_ids_BT)
    tokens_BT = gj.generate_greedy(cfg, params, input_ids_BL, max_new_tokens=32)

Importing goose_jax imports neither TensorFlow nor torch.

Shape legend. Arrays are named with their shape as a suffix (``scores_NE``, ``lora_a_EIR``), and
the whole package uses these letters:

    B  batch (examples)                  I  a site's input width
    L  encoder length                    O  a site's output width
    T  decoder length                    F  d_ff
    N  tokens of a flattened batch       H  heads
    C  answer choices                    K  head dim (d_kv)
    D  d_model                           V  vocabulary
    E  experts                           R  LoRA rank
    k  experts per token (top-k)

Any other letter is defined where it is used. ``...`` in a documented shape stands for any
leading axes.
"""

# First, before the heavy imports below: a goose-jax tool interrupted while it starts prints its
# one line and exits 130 (goose_jax.core.tool_process); other importers are left alone.
from goose_jax.core import tool_process as _tool_process

_tool_process.install_if_tool()

from goose_jax.models.config import DTypePolicy
from goose_jax.models.llama.config import DecoderConfig
from goose_jax.models.llama.generation import generate_decoder_greedy
from goose_jax.models.llama.hf import load_hf_llama, save_hf_llama
from goose_jax.models.llama.model import decoder_logits
from goose_jax.models.t5.config import T5Config
from goose_jax.models.t5.generation import generate_greedy
from goose_jax.models.t5.hf import load_hf_t5, save_hf_t5
from goose_jax.models.t5.model import T5, init_params, param_logical_axes, site_shapes, t5_logits

__version__ = "0.1.0"

__all__ = [
    "DTypePolicy", "DecoderConfig", "T5", "T5Config", "decoder_logits", "generate_decoder_greedy",
    "generate_greedy", "init_params", "load_hf_llama", "load_hf_t5", "param_logical_axes",
    "save_hf_llama", "save_hf_t5", "site_shapes", "t5_logits",
]
