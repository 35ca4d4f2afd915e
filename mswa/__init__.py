"""Multi-Scale Window Attention: window schedules, O(N*W) attention kernels, and a training framework."""
