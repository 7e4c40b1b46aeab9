"""Native Phi-3(.5)-vision for transformers: model, processor and fine-tuning machinery.

Importing this package registers the classes with the Auto API, so a `phi3_v` checkpoint
(a Hub id or a local directory) loads without `trust_remote_code`:

    import phivision
    model = AutoModelForCausalLM.from_pretrained("microsoft/Phi-3.5-vision-instruct")
    processor = AutoProcessor.from_pretrained("microsoft/Phi-3.5-vision-instruct")
"""

from .console import quiet_library_notices

quiet_library_notices()  # before transformers and the libraries it imports get to speak

from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoProcessor  # noqa: E402

from .phi3v.configuration import Phi3VConfig
from .phi3v.image_processing import Phi3VImageProcessor
from .phi3v.modeling import Phi3VForCausalLM, Phi3VModel
from .phi3v.processing import Phi3VProcessor

AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM)
# AutoImageProcessor picks a backend ("torchvision" when installed, else "pil"): same class for both.
AutoImageProcessor.register(
    Phi3VConfig, image_processor_classes={"pil": Phi3VImageProcessor, "torchvision": Phi3VImageProcessor}
)
AutoProcessor.register(Phi3VConfig, Phi3VProcessor)

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VModel", "Phi3VImageProcessor", "Phi3VProcessor"]
