"""Entry points of the ``sparse-detector`` CLI (bench, sim, demo, ...). ROS-free except demo."""
import argparse


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse's one-line error naming the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an int >= 1")
    return value
