"""What callers share and how it is divided: fair admission and the memory budget, the fair
preprocessing dispatcher, memory accounting and the allocator's trimmer."""
