"""A tiny network for the training-loop tests (the loop is the same for
AlexNet; this keeps each run to seconds on a 2-core CPU), and a command-line
entry that trains it, for the tests that need a separate process (signals,
torchrun):

    python tests/tiny_training.py [alexnet_ext.train options]

Environment: TINY_SLEEP_S (sleep in every training forward, so a signal can
arrive mid-run), TINY_MARKER (a file created at the first training forward).
"""
import os
import sys
import time

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten())
        self.drop = nn.Dropout(0.3)  # dropout draws from the global RNG: resume must restore it
        self.fc = nn.Linear(32, num_classes)
        self._marked = False

    def forward(self, x):
        if self.training:
            if os.environ.get("TINY_MARKER") and not self._marked:
                open(os.environ["TINY_MARKER"], "w").close()
                self._marked = True
            if os.environ.get("TINY_SLEEP_S"):
                time.sleep(float(os.environ["TINY_SLEEP_S"]))
        # The 0..255-scale inputs are brought to unit scale for this shallow net.
        return self.fc(self.drop(self.features(x / 64.0)))


def tiny_model(args, num_classes):
    return TinyNet(num_classes)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from alexnet_ext import train
    sys.exit(train.main(sys.argv[1:], model_fn=tiny_model))
