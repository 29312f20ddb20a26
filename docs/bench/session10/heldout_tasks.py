"""Held-out toy tasks for `bench --evaluator` (session 10): intents that no setting was chosen on.

Each is a new hidden intent behind a prompt the toy model knows, scored from pixels with the toy's
own helpers (`hero_engine.toy.tasks`); good iff score >= the threshold given on the command line.

- ``two_circles`` (prompt ``circles``, threshold 0): exactly two round blobs (the training data
  draws 1-5 circles).
- ``red_left_of_blue`` (prompt ``a red circle and a blue square``, threshold 0): the red blob is
  left of the blue one (dx >= 3 px and dx >= |dy|); the `spatial` task asks for "above".
- ``green_square`` (prompt ``a square``, threshold 0.5): the square is green; `colour` asks blue.
"""
from hero_engine.toy.tasks import score_colour, score_count, score_spatial


def two_circles(images, prompts=None):
    return score_count(images, target=2)


def red_left_of_blue(images, prompts=None):
    # left of, in the image, is above, in the image transposed: `spatial`'s own score
    return score_spatial(images.transpose(-1, -2), upper="red", lower="blue")


def green_square(images, prompts=None):
    return score_colour(images, colour="green")
