"""`python -m vip.train --config P k=v …`: pretraining under a launcher (launch/pretrain.sh)."""
from vip.train.launcher import exit_now
from vip.train.pretrain import main

exit_now(main())
