"""The published field names, defined once: every module that reads or writes a release record, a
scoring annotation or the encrypted instructions names a field through these."""

from __future__ import annotations

DUPLICATE = "duplicate_user_instruction_ja"  # conversation_id of the first identical instruction
EMPTY = "empty_user_instruction_ja"  # the Japanese instruction is empty or blank
TEMPLATE = "is_template_instruction"  # the template category, or null
RESPONSES = "synthesized_assistant_responses"  # the Japanese responses, [{role, content}]
NOTES = "synthesized_response_scoring_annotations"  # one annotation per Japanese response
RESPONSES_EN = "synthesized_assistant_responses_en"  # the English responses
MULTITURN = "synthesized_multiturn_conversation"  # Gemma-2: a list of one conversation
INSTRUCTION = "translated_conversation"  # the encrypted file's [{role: user, content}]
# the fields of an annotation
JUDGEMENT = "judgement"
SCORE = "preference_score"
TOKENS = "response_token_length"
REPETITION = "repetition_flag"
