"""Native Phi-3(.5)-vision for transformers: model, processor and fine-tuning machinery.

Importing this package registers the classes with the Auto API, so a `phi3_v` checkpoint
(a Hub id or a local directory) loads without `trust_remote_code`:

    import phi3v
    model = AutoModelForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct")
    processor = AutoProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct")
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import Phi3VConfig
from .modeling import Phi3VForCausalLM, Phi3VModel

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VModel"]
