"""The fixed vocabularies shared by the library and the command line, kept in a module with
no imports so that the CLI can build its options without loading the library."""

# How structured (JSON) answers are asked for; see pipeline.structured.
STRUCTURED_OUTPUT_CHOICES = ("auto", "json_schema", "json_object", "prompt")
# Who speaks next when three or more roles talk; see pipeline.dialogue.
FLOORS = ("round-robin", "moderator")
# What `pipeline export` writes; see pipeline.export.
EXPORT_FORMATS = ("md", "txt", "jsonl", "finetune")
# The forms of a fine-tuning dataset: OpenAI chat lines, or legacy prompt/completion pairs;
# see pipeline.dataset.
DATASET_FORMATS = ("chat", "completion")
# The token with which a role declares the task done, unless --done-token says another;
# see pipeline.termination.
DEFAULT_DONE_TOKEN = "<TASK_DONE>"
# How tools are offered to a role: OpenAI tool calls, a text protocol in the prompt, or
# auto (known per server, else tool calls, falling back to the prompt); see pipeline.tools.
TOOL_CALL_CHOICES = ("auto", "tools", "prompt")
# The chat exports `pipeline import` reads; see pipeline.chats.
IMPORT_FORMATS = ("whatsapp", "telegram", "chatgpt")
