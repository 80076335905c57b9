import os
import sys

# Test helpers (reference implementations) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
