"""InternVL chat configuration, shipped inside DvD-generated custom-format checkpoints (loaded via auto_map)."""

from transformers import AutoConfig, PretrainedConfig

from .configuration_intern_vit import InternVisionConfig


class InternVLChatConfig(PretrainedConfig):
    """ViT (`vision_config`) + `mlp1` projector + LLM (`llm_config`, e.g. a Qwen3 config)."""

    model_type = "internvl_chat"

    def __init__(
        self,
        vision_config=None,
        llm_config=None,
        use_backbone_lora=0,
        use_llm_lora=0,
        select_layer=-1,
        force_image_size=None,
        downsample_ratio=0.5,
        template=None,
        dynamic_image_size=False,
        use_thumbnail=False,
        ps_version="v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(vision_config, PretrainedConfig):
            self.vision_config = vision_config
        else:
            self.vision_config = InternVisionConfig(**(vision_config or {}))
        if isinstance(llm_config, PretrainedConfig):
            self.llm_config = llm_config
        else:
            llm_config = dict(llm_config or {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
            self.llm_config = AutoConfig.for_model(llm_config.pop("model_type", "qwen3"), **llm_config)
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version  # "v2": the pixel shuffle without the transposed output of "v1"
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.tie_word_embeddings = self.llm_config.tie_word_embeddings
