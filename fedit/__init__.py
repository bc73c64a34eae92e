"""fedit: federated instruction tuning (FedIT) of large language models with LoRA.

Implements "Towards Building the FederatedGPT: Federated Instruction Tuning"
(Zhang et al., 2023): clients fine-tune a shared LoRA adapter on their own
instruction data and a server aggregates the adapters round after round.
"""

__version__ = "0.1.0"
