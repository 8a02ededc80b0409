"""normbench: how does each normalization layer behave as the batch shrinks?"""

__version__ = "0.1.0"
