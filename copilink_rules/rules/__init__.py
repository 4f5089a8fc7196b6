"""Rule files: the format (spec), expressions, and loading into a Policy."""

from .loader import CompiledRule, Policy, load_policy, parse_overrides

__all__ = ["CompiledRule", "Policy", "load_policy", "parse_overrides"]
