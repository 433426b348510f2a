"""Where a run lives: local or object storage (`fs`), atomic writes, the run record and its vote
parts (`storage`), the vote row (`votes`), the run's identity and its one-writer lock."""
