import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py
torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores
