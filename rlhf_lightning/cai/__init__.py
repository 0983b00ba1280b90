"""Constitutional AI (Bai et al. 2022): constitution files, SL-CAI critique -> revision data,
AI-feedback soft preference labels. These steps write ordinary SFT and preference files that
the training stages read; the pipeline stages ``cai_revise`` and ``cai_label`` run them."""

from rlhf_lightning.cai.constitution import (
    ChatFormat,
    Constitution,
    ConstitutionError,
    FeedbackQuestion,
    Principle,
    load_constitution,
    parse_constitution,
)

__all__ = [
    "ChatFormat",
    "Constitution",
    "ConstitutionError",
    "FeedbackQuestion",
    "Principle",
    "load_constitution",
    "parse_constitution",
]
