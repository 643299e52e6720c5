"""The synthetic shape world: scenes with exact COCO ground truth, biased training descriptions, a bootstrapped
tiny LLaVA base policy, and ground-truth feedback, for running and measuring RLAIF-V end to end on a CPU."""
