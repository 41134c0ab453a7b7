"""RWMN: the Read-Write Memory Network (Na et al., ICCV 2017) in PyTorch."""
