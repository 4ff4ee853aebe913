"""The contracts every layer shares; no upstream (llava) import at module level."""
