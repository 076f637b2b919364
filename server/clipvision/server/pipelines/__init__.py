"""One pipeline per modality, shared by every protocol: images (sources, the guarded fetcher,
admission, decode, batch), texts (tokenize, admit, batch) and Classify over both."""
