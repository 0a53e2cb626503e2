"""Token recycling: density-peak kNN clustering of deleted tokens into merged tokens
(SPARSEVLM.md section 4), batched over samples with padding; distances come from Gram
matrices (S x R x R), never S x R x R x D differences.

For one sample's recycled hidden states x_1..x_R and C clusters:
    d_ij = |x_i - x_j| / sqrt(D)
    rho_i = exp(-mean of d_ij^2 over the C nearest j, i itself included)
    delta_i = min d_ij over denser j (j is denser if rho_j > rho_i, or equal and j < i);
              the densest token gets max_j d_ij
    centres = top-C by rho_i * delta_i (ties: lower index); each token joins its nearest
              centre (ties: lower centre); a merged token is the mean of its members.
"""

from __future__ import annotations

import torch

from .ragged import to_device


def density_peak_merge(x: torch.Tensor, valid: torch.Tensor, clusters: list[int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (S, R, D), valid (S, R) bool (valid entries first), clusters: per sample C (host list;
    the shapes depend on it, so asking the device would stall the pipeline), with
    1 <= C <= number valid (or 0 for an empty sample). -> (merged (S, Cmax, D) float32,
    centres (S, Cmax) long: index of each cluster's centre among the R inputs, in ascending
    order, assignment (S, R) long: cluster of every input). Entries past a sample's C are 0."""
    s, r, d = x.shape
    x = x.float()
    width = max(clusters, default=0)
    n_clusters = to_device(torch.tensor(clusters, dtype=torch.long), x.device)
    if r == 0 or width == 0:
        return x.new_zeros(s, width, d), torch.zeros(s, width, dtype=torch.long, device=x.device), \
            torch.zeros(s, r, dtype=torch.long, device=x.device)
    norms = (x * x).sum(-1)
    d2 = (norms[:, :, None] + norms[:, None, :] - 2 * torch.bmm(x, x.transpose(1, 2))).clamp_min(0) / d
    eye = torch.eye(r, dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(eye, 0.0)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    column = torch.arange(r, device=x.device)

    nearest = d2.masked_fill(~pair_valid, float("inf")).topk(width, dim=-1, largest=False).values  # S, R, Cmax
    take = column[:width][None, None, :] < n_clusters[:, None, None]
    mean_nearest = torch.where(take, nearest, 0.0).sum(-1) / n_clusters.clamp_min(1)[:, None]
    rho = torch.exp(-mean_nearest)

    dist = d2.sqrt()
    denser = (rho[:, None, :] > rho[:, :, None]) | ((rho[:, None, :] == rho[:, :, None])
                                                   & (column[None, None, :] < column[None, :, None]))
    denser &= pair_valid
    delta = torch.where(denser, dist, float("inf")).min(-1).values
    farthest = torch.where(pair_valid, dist, 0.0).max(-1).values
    delta = torch.where(denser.any(-1), delta, farthest)

    gamma = torch.where(valid, rho * delta, float("-inf"))
    by_gamma = torch.sort(gamma, dim=1, descending=True, stable=True).indices[:, :width]
    centre_valid = column[:width][None, :] < n_clusters[:, None]
    centres = torch.where(centre_valid, by_gamma, r).sort(dim=1).values  # ascending; padding (= r) last
    centres = torch.where(centre_valid, centres, 0)

    to_centre = torch.gather(dist, 2, centres[:, None, :].expand(s, r, width))  # S, R, Cmax
    to_centre = to_centre.masked_fill(~centre_valid[:, None, :], float("inf"))
    assignment = to_centre.argmin(-1)  # first minimum: ties go to the lower centre
    is_centre = torch.zeros(s, r + 1, dtype=torch.long, device=x.device)
    is_centre.scatter_(1, torch.where(centre_valid, centres, r), column[:width].expand(s, width) + 1)
    own = is_centre[:, :r] - 1  # a centre always belongs to its own cluster
    assignment = torch.where(own >= 0, own, assignment).masked_fill(~valid, 0)

    members = torch.nn.functional.one_hot(assignment, width).float() * valid[:, :, None]  # S, R, Cmax
    merged = torch.bmm(members.transpose(1, 2), x) / members.sum(1)[:, :, None].clamp_min(1)
    return merged, centres, assignment
