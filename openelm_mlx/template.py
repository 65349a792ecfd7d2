"""The OpenELM Instruct template: one place for it, shared by generate, chat and every front end.

Apple tuned the Instruct models with plain-text role markers, each turn ended by
EOS: ``<|system|>\\n{sys}</s>\\n<|user|>\\n{msg}</s>\\n<|assistant|>\\n``.  (The
Llama-2 ``[INST]`` template produces garbage with them.)
"""

from __future__ import annotations

from .errors import OpenELMError


def turn_text(message: str, system_prompt: str | None = None) -> str:
    text = f"<|system|>\n{system_prompt}</s>\n" if system_prompt else ""
    return text + f"<|user|>\n{message}</s>\n<|assistant|>\n"


def format_prompt(prompt: str, instruct: bool, system_prompt: str | None = None, chat_template: str = "auto") -> str:
    """``chat_template``: 'auto' (the template for Instruct models), 'instruct' (always) or 'none'."""
    if chat_template not in ("auto", "instruct", "none"):
        raise OpenELMError(f"--chat-template {chat_template}: choose auto, instruct or none")
    if chat_template == "instruct" or (chat_template == "auto" and instruct):
        return turn_text(prompt, system_prompt)
    if system_prompt:
        raise OpenELMError(
            "--system-prompt needs the Instruct template (an Instruct model or --chat-template instruct)"
        )
    return prompt


def format_messages(turns: list[tuple[str, str]], instruct: bool) -> str:
    """A whole conversation (``(role, text)`` with roles system, user, assistant), ready for the
    reply.  Instruct models: the template above, each turn closed by EOS (so a resent
    conversation tokenizes as the chat CLI's kept history does).  Base models have no template:
    they get a plain transcript, ``System text\\n\\nUser: ...\\nAssistant: ...\\nAssistant:``."""
    if instruct:
        marker = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
        return "".join(f"{marker[role]}\n{text}</s>\n" for role, text in turns) + "<|assistant|>\n"
    label = {"user": "User: ", "assistant": "Assistant: "}
    parts = [f"{text}\n\n" if role == "system" else f"{label[role]}{text}\n" for role, text in turns]
    return "".join(parts) + "Assistant:"
