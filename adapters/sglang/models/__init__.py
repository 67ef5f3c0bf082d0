"""Model classes for sglang's ModelRegistry: every module here that exports ``EntryClass`` registers
it under the class name (the Hugging Face architecture)."""
