"""Data profiles: how one JSONL record becomes chat messages.

    from profiles import get_profile
    profile = get_profile("alpaca")            # chat | alpaca | sharegpt | completion | text | "pkg.mod:Class"
    profile.transform_example(record, index, system_prompt)   # -> {"messages": [...]}

A profile is pure: no tokenizer, no I/O, deterministic per record index. Write your own by
subclassing `Profile` (see its docstring).
"""

from profiles.base import ROLES, Profile, RecordError, check_messages, check_tools, with_system_prompt
from profiles.builtin import (
    BUILTIN_PROFILES,
    AlpacaProfile,
    ChatProfile,
    CompletionProfile,
    ShareGPTProfile,
    TextProfile,
)
from profiles.registry import available_profiles, fill_system_prompt, get_profile, profile_fingerprint

__all__ = [
    "BUILTIN_PROFILES", "ROLES", "AlpacaProfile", "ChatProfile", "CompletionProfile", "Profile", "RecordError",
    "ShareGPTProfile", "TextProfile", "available_profiles", "check_messages", "check_tools", "fill_system_prompt",
    "get_profile", "profile_fingerprint", "with_system_prompt",
]
