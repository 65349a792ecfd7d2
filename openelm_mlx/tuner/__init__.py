"""Fine-tuning: LoRA, DoRA and full fine-tuning of OpenELM (QLoRA on quantized models), fusing
adapters into a converted directory, and data-parallel training over ``mx.distributed``."""
