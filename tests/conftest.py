import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
