"""medcap: fine-tune BLIP with QLoRA on IU X-Ray chest radiographs.

Stage modules follow the notebooks: :mod:`data` (01), :mod:`baselines` (02), :mod:`train` (03),
:mod:`sweep` (04), :mod:`merge` (05), :mod:`evaluation` and :mod:`demo` (06); :mod:`pipeline` runs
them; the shared modules are listed in the README ("How the code is laid out").
"""

from medcap_helpers.config import MedcapConfig
from medcap_helpers.errors import ConfigError, MedcapError

__all__ = ["ConfigError", "MedcapConfig", "MedcapError"]
__version__ = "0.1.0"
