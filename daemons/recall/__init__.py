"""Recall: brings files back from tape to a disk buffer, one mount per cartridge, in fseq order."""
