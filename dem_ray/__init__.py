"""dem-ray: Distribution-Edited Models on Ray.

Fine-tune a base model once per dataset, take the distribution vectors
v_i = theta_i - theta_0, and search the coefficients of theta_0 + sum_i w_i v_i
by validation perplexity with Optuna over a pool of resident evaluator actors.
"""

__version__ = "0.1.0"
