"""The demo task's grammar: prompt and response templates and the sentiment lexicon.

``demo.py`` generates prompts and responses from these and judges them with the gold
reward, whose lexicon (word -> polarity) lives here too.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- prompt grammar
OPENERS = (
    "Review of",
    "My thoughts on",
    "Here is what I think of",
    "A few words about",
    "Notes on",
    "Quick review of",
    "My honest opinion of",
    "Let me tell you about",
    "Some thoughts on",
    "A short review of",
)
SUBJECTS = (
    "the film",
    "this movie",
    "the new thriller",
    "the comedy",
    "the documentary",
    "the sequel",
    "the drama",
    "the cartoon",
    "the western",
    "the musical",
    "the horror movie",
    "the war film",
)
CONTEXTS = (
    "I watched last night",
    "from the festival",
    "everyone is talking about",
    "my friend picked",
    "I saw on the plane",
    "at the old cinema",
    "on TV",
    "from last summer",
    "with the famous cast",
    "by the young director",
    "that just came out",
    "I rented",
)

# ----------------------------------------------------------------------------- response grammar
ASPECTS = (
    "acting",
    "story",
    "plot",
    "script",
    "music",
    "soundtrack",
    "ending",
    "dialogue",
    "cast",
    "pacing",
    "humor",
    "photography",
    "editing",
    "lead actor",
    "villain",
    "lighting",
    "main character",
    "set design",
    "direction",
    "opening scene",
)
NOUNS = ("film", "movie", "experience", "evening", "ride")
OBJECTS = ("it", "every minute", "the whole thing", "this one", "each scene")
AUDIENCES = ("anyone", "my friends", "families", "fans of the genre", "everyone", "kids")
INTENSIFIERS = ("very", "really", "truly")
NEUTRAL_ADJ = ("long", "short", "quiet", "simple", "modern", "dark", "colorful", "loud", "unusual", "familiar")
# Polarities of the lexicon; positive and negative lists mirror each other (same strengths).
POS_ADJ = {
    "wonderful": 2,
    "brilliant": 2,
    "superb": 2,
    "excellent": 2,
    "fantastic": 2,
    "beautiful": 2,
    "good": 1,
    "nice": 1,
    "fun": 1,
    "solid": 1,
    "charming": 1,
    "clever": 1,
}
NEG_ADJ = {
    "terrible": -2,
    "awful": -2,
    "dreadful": -2,
    "horrible": -2,
    "painful": -2,
    "tedious": -2,
    "bad": -1,
    "dull": -1,
    "weak": -1,
    "bland": -1,
    "clumsy": -1,
    "silly": -1,
}
POS_VERB = {"loved": 2, "adored": 2, "enjoyed": 1, "liked": 1}
NEG_VERB = {"hated": -2, "despised": -2, "disliked": -1, "regretted": -1}
POS_THING = {"gem": 2, "delight": 2, "treat": 1, "joy": 1}
NEG_THING = {"disaster": -2, "waste": -2, "mess": -1, "bore": -1}
LEXICON = {**POS_ADJ, **NEG_ADJ, **POS_VERB, **NEG_VERB, **POS_THING, **NEG_THING, "recommend": 1}

# Polar sentences; {adj}/{verb}/{thing} take the sentence's polarity, {opp} the opposite one
# (negated, so "The plot was not awful." is mildly positive), {rec} is "" or "not ".
POLAR_TEMPLATES = (
    "The {aspect} was {int}{adj}",
    "The {aspect} felt {int}{adj}",
    "I thought the {aspect} was {int}{adj}",
    "It was {a_adj} {noun}",
    "I {verb} {object}",
    "What {a_thing}",
    "The {aspect} was not {opp}",
    "I would {rec}recommend it to {audience}",
    "Overall, {a_adj} {noun}",
)
NEUTRAL_TEMPLATES = (
    "I watched it {when} with {companion}",
    "It runs for about {duration}",
    "The {aspect} was {neutral}",
    "I saw it at the {venue}",
    "The film is set in {place}",
    "It is based on {source}",
    "The {aspect} reminded me of {memory}",
)
MIXED_TEMPLATES = (
    "The {aspect} was {pos} but the {aspect2} was {neg}",
    "The {aspect} was {neg} but the {aspect2} was {pos}",
    "The {aspect} felt {pos}, yet the {aspect2} was {neg}",
)
NEUTRAL_FILL = {
    "when": ("last night", "on Sunday", "on Friday", "this weekend", "in the afternoon"),
    "companion": ("my sister", "my brother", "a friend", "my parents", "my kids", "my partner"),
    "duration": ("two hours", "ninety minutes", "three hours", "an hour"),
    "venue": ("local cinema", "festival", "old theater", "mall"),
    "place": ("Paris", "a small town", "space", "the desert", "New York", "the future"),
    "source": ("a true story", "a novel", "a comic book", "a play", "an old song"),
    "memory": ("an old western", "my childhood", "a play", "a novel"),
}
# Sentence kinds per response tone; tones are balanced so the mean gold reward is near 0.
TONES = {
    "positive": ({"pos": 3, "neutral": 1}, 0.3),
    "negative": ({"neg": 3, "neutral": 1}, 0.3),
    "neutral": ({"neutral": 1}, 0.2),
    "mixed": ({"mixed": 4, "pos": 3, "neg": 3}, 0.2),
}
