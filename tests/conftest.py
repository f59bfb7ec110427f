import os
import sys

# train.py and sample.py live at the repository root, next to this folder
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
