"""Texts of the synthetic corpus in three registers (the language domain gap in miniature).

CLIP-ViP's premise (docs/architecture.md, "Auxiliary captions") is that HD-VILA's ASR subtitles
are far, in language, from downstream descriptions, and that image captions of the middle frame
are much closer. The synthetic corpus reproduces the three registers from one clip plan
(colour, shape, direction):

* `speech_subtitle`: what an ASR transcript of a narrator might read: filler words, colloquial
  names for the shape ("the ball", "that box"), the motion said in other words ("drifting over
  that way", "sinking to the bottom"), ASR confusions of colour words ("read" for red), and lines
  that have nothing to do with the picture ("don't forget to subscribe"). Often only part of
  the content is said, sometimes none of it.
* `description`: a short MSR-VTT-like description: colour, shape and motion ("a red circle moves
  to the left"). The held-out evaluation set's texts.
* `image_description`: what an image captioner's training data says about one frame: colour and
  shape, no motion ("a picture of a red circle"). The captioner's training targets.

All three are pure functions of (clip attributes, numpy Generator): deterministic from a seed.
"""
from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------- descriptions (MSR-VTT-like)
DESCRIPTION_TEMPLATES = (
    "{a} {c} {s} moves {d}",
    "{a} {c} {s} is moving {d}",
    "{c} {s} moving {d}",
    "{a} {c} {s} slides {d} across the screen",
    "{a} {c} {s} travels {d}",
    "an animation of {a} {c} {s} going {d}",
)
DESCRIPTION_DIRECTIONS = {
    "left": ("to the left", "left", "leftwards"),
    "right": ("to the right", "right", "rightwards"),
    "up": ("up", "upwards", "to the top"),
    "down": ("down", "downwards", "to the bottom"),
}

# --------------------------------------------------------------------------- image captions (no motion)
IMAGE_TEMPLATES = (     # COCO-like; the short form is the most common (greedy decoding settles on it)
    "{a} {c} {s}",
    "{a} {c} {s}",
    "{a} {c} {s} on a dark background",
    "a picture of {a} {c} {s}",
)

# --------------------------------------------------------------------------- speech (ASR-like)
FILLERS = ("um", "uh", "so", "like", "you know", "okay", "right", "basically", "i mean", "alright")
SHAPE_SLANG = {
    "circle": ("ball", "round one", "dot", "circle", "little circle thing"),
    "square": ("box", "block", "square", "square thing", "little box"),
    "triangle": ("pointy one", "triangle", "triangle thing", "wedge", "little pyramid"),
}
MOTION_SLANG = {
    "left": ("drifting over to the left", "heading back that way", "scooting left", "going over to my left",
             "sliding off to the left side"),
    "right": ("drifting over to the right", "heading off that way", "scooting right", "going over to my right",
              "sliding off to the right side"),
    "up": ("floating up", "climbing to the top", "rising up there", "going up up up", "heading for the ceiling"),
    "down": ("dropping down", "sinking to the bottom", "falling down there", "going down", "heading for the floor"),
}
ASR_CONFUSIONS = {      # colour words an ASR system mishears (homophones and near misses)
    "red": "read", "blue": "blew", "green": "grain", "yellow": "jello", "purple": "purpose",
    "orange": "arrange", "white": "wide", "cyan": "sigh in",
}
OFF_TOPIC = (
    "don't forget to like and subscribe",
    "anyway my cousin told me about this last week",
    "let me know in the comments what you think",
    "okay so where was i",
    "i had the best sandwich today honestly",
    "this part always gets me",
    "we'll get back to that in a second",
    "thanks for watching guys",
    "the weather has been crazy lately",
    "hold on let me check something",
)
SPEECH_OPENERS = ("so here we've got", "now look at", "and then there's", "okay watch", "check out", "we have")

# probabilities of each part of a speech subtitle being said (and said right)
P_OFF_TOPIC_ONLY = 0.2     # the line is about something else entirely
P_COLOUR, P_SHAPE, P_MOTION = 0.65, 0.55, 0.5
P_ASR_ERROR = 0.15         # a said colour word is mis-transcribed
P_EXTRA_OFF_TOPIC = 0.3    # an off-topic line is appended to an on-topic one
P_FILLER = 0.5             # a filler word before each phrase


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def description(colour: str, shape: str, direction: str, rng: np.random.Generator) -> str:
    """Short MSR-VTT-like description naming colour, shape and motion."""
    t = _pick(rng, DESCRIPTION_TEMPLATES)
    return t.format(a=article(colour), c=colour, s=shape, d=_pick(rng, DESCRIPTION_DIRECTIONS[direction]))


def image_description(colour: str, shape: str, rng: np.random.Generator) -> str:
    """What an image-caption dataset says about one frame: colour and shape, no motion."""
    return _pick(rng, IMAGE_TEMPLATES).format(a=article(colour), c=colour, s=shape)


def speech_subtitle(colour: str, shape: str, direction: str, rng: np.random.Generator) -> str:
    """An ASR-transcript-like line, loosely and noisily related to the clip (module docstring)."""
    if rng.random() < P_OFF_TOPIC_ONLY:
        return _with_fillers([_pick(rng, OFF_TOPIC)], rng)
    say_colour, say_shape, say_motion = (rng.random() < P_COLOUR, rng.random() < P_SHAPE, rng.random() < P_MOTION)
    if not (say_colour or say_shape or say_motion):
        say_shape = True                                   # an on-topic line says at least something
    c = colour
    if say_colour and rng.random() < P_ASR_ERROR:
        c = ASR_CONFUSIONS[colour]
    noun = _pick(rng, SHAPE_SLANG[shape]) if say_shape else _pick(rng, ("thing", "one", "guy", "shape"))
    subject = f"this {c} {noun}" if say_colour else f"this {noun}"
    phrases = [f"{_pick(rng, SPEECH_OPENERS)} {subject}"]
    if say_motion:
        phrases.append(f"and it's {_pick(rng, MOTION_SLANG[direction])}")
    else:
        phrases.append(_pick(rng, ("just doing its thing", "and yeah", "pretty cool right", "look at that")))
    if rng.random() < P_EXTRA_OFF_TOPIC:
        phrases.append(_pick(rng, OFF_TOPIC))
    return _with_fillers(phrases, rng)


def _with_fillers(phrases: list[str], rng: np.random.Generator) -> str:
    words = []
    for p in phrases:
        if rng.random() < P_FILLER:
            words.append(_pick(rng, FILLERS))
        words.append(p)
    return " ".join(words)


def clip_text(style: str, colour: str, shape: str, direction: str, rng: np.random.Generator) -> str:
    """The subtitle of a clip in register `style`: speech | description (template: shards.synth.describe)."""
    if style == "speech":
        return speech_subtitle(colour, shape, direction, rng)
    if style == "description":
        return description(colour, shape, direction, rng)
    raise ValueError(f"text style must be speech or description, got {style!r}")
