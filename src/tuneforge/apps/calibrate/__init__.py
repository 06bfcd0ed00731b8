"""``tuneforge calibrate RUN --data FILE``: fit an existing run's temperature on a labelled file.

Training fits it on the validation split by itself (``train.calibrate``); this is for runs trained
before that, runs whose validation split was too small, and optimized variants fitted anew on other
texts. The mechanism is :mod:`tuneforge.infer.calibration`.
"""
