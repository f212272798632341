"""How a question about one image or one video is put to a model.

LLaVA checkpoints are asked in LLaVA-1.5's v1 conversation format (a video in
LLaVA-NeXT-Video's), as the llava-hf examples and the shipped model's training do; every
other model (Qwen-VL) in its own chat template, with the media item first.
"""

from __future__ import annotations

LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5 (v1 conversation)
VIDEO_PROMPT = "USER: <video>\n{question} ASSISTANT:"  # LLaVA-NeXT-Video's format
TEXT_ONLY_PROMPT = "USER: {question} ASSISTANT:"


def question_prompt(architecture: str, tokenizer, modality: str | None, question: str) -> str:
    """The prompt asking ``question`` about one ``modality`` item ("image", "video" or
    None for a text-only question) of a model with this (VTW or stock) architecture."""
    if architecture.startswith("Llava"):
        template = {"image": LLAVA_PROMPT, "video": VIDEO_PROMPT, None: TEXT_ONLY_PROMPT}
        return template[modality].format(question=question)
    content = ([{"type": modality}] if modality else []) + [{"type": "text", "text": question}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def engine_prompt(llm, modality: str | None, question: str) -> str:
    """:func:`question_prompt` for a vLLM ``LLM``'s model."""
    architecture = llm.llm_engine.model_config.hf_config.architectures[0]
    return question_prompt(architecture, llm.get_tokenizer(), modality, question)
