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


ROLES = ("system", "user", "assistant")


def format_messages(turns: list[tuple[str, str]], instruct: bool, add_generation_prompt: bool = True) -> str:
    """A whole conversation (``(role, text)`` with roles system, user, assistant).

    Instruct models: the template above, each turn closed by EOS (so a resent conversation
    tokenizes as the chat CLI's kept history does), then the opening of the reply; without
    ``add_generation_prompt`` a last assistant turn is left open, to be continued (lm-eval's
    few-shot chat rendering).  Base models have no template: they get a plain transcript,
    ``System text\\n\\nUser: ...\\nAssistant: ...\\nAssistant:``."""
    for role, _ in turns:
        if role not in ROLES:
            raise OpenELMError(f"message role {role!r}: expected one of {', '.join(ROLES)}")
    open_end = not add_generation_prompt and bool(turns) and turns[-1][0] == "assistant"
    if instruct:
        text = "".join(f"<|{role}|>\n{body}</s>\n" for role, body in turns)
        if open_end:
            return text[: -len("</s>\n")]
        return text + ("<|assistant|>\n" if add_generation_prompt else "")
    label = {"user": "User: ", "assistant": "Assistant: "}
    parts = [f"{body}\n\n" if role == "system" else f"{label[role]}{body}\n" for role, body in turns]
    if open_end:
        return "".join(parts)[:-1]
    return "".join(parts) + ("Assistant:" if add_generation_prompt else "")
