"""Parameters of the simulated microscope: optics, camera, sample, dye, drift, live sample.

One pydantic model per physical part, every number with its unit in the name
and a range check, so a bad value is refused at load with the field named.
The defaults are the demo's: an Alexa 647-like dSTORM sample on microtubule-like
filaments, imaged through a 1.45 NA oil objective with an astigmatic lens onto
a sCMOS camera with 100 nm pixels. With activation 100 mW, excitation 50 mW and
20 ms exposures a 64 x 64 px frame shows about 10-20 emitters with about
2000 photons each on a background of 20 photons/px. `mode: live` swaps the
blinking sample for `LiveConfig`'s mitochondria-like network (same optics,
camera and drift). `slide_fields` makes the SMLM sample larger than one field,
for an XY stage to move over.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpticsConfig(_Strict):
    """Objective, emission and the astigmatic PSF (Huang et al., Science 2008)."""

    wavelength_nm: float = Field(670.0, gt=0, description="emission wavelength (nm)")
    na: float = Field(1.45, gt=0, description="numerical aperture of the objective")
    immersion_index: float = Field(
        1.518, ge=1, description="refractive index of the immersion medium (oil: 1.518)"
    )
    psf_sigma_nm: float | None = Field(
        130.0,
        gt=0,
        description="Gaussian PSF width (nm, sample plane) at each axis's own focus "
        "(s0 of the astigmatic model); null: 0.21 * wavelength_nm / na",
    )
    astig_focal_offset_nm: float = Field(
        300.0,
        ge=0,
        description="c of the astigmatic model (nm): sigma_x is smallest at z=+c, "
        "sigma_y at z=-c, so the sign of z is visible in the PSF's elongation",
    )
    astig_depth_nm: float = Field(
        400.0,
        gt=0,
        description="d of the astigmatic model (nm): the depth of focus over which "
        "a width grows by sqrt(2)",
    )

    @model_validator(mode="after")
    def _na_below_immersion_index(self) -> OpticsConfig:
        if self.na >= self.immersion_index:
            raise ValueError(
                f"na ({self.na}) must be smaller than immersion_index "
                f"({self.immersion_index}): an objective cannot collect beyond "
                "the medium's refractive index"
            )
        return self

    def sigma0_nm(self) -> float:
        """In-focus PSF sigma (nm): the configured one, else the paraxial estimate."""
        if self.psf_sigma_nm is not None:
            return float(self.psf_sigma_nm)
        return 0.21 * self.wavelength_nm / self.na


class CameraConfig(_Strict):
    """Sensor geometry and the photon → ADU chain (sCMOS by default, EMCCD if em_gain > 1)."""

    width_px: int = Field(64, ge=8, le=4096, description="frame width (pixels)")
    height_px: int = Field(64, ge=8, le=4096, description="frame height (pixels)")
    pixel_size_nm: float = Field(
        100.0, gt=0, description="pixel size in the sample plane (nm), camera pixel / magnification"
    )
    qe: float = Field(0.8, gt=0, le=1, description="quantum efficiency at the emission wavelength")
    read_noise_e: float = Field(1.5, ge=0, description="read noise, rms electrons per pixel")
    offset_adu: float = Field(100.0, ge=0, description="baseline (ADU) added to every pixel")
    e_per_adu: float = Field(
        0.5, gt=0, description="conversion factor: electrons per ADU (after EM gain)"
    )
    em_gain: float = Field(
        1.0,
        ge=1,
        description="EM gain; > 1 makes an EMCCD (gamma-distributed gain, excess noise factor 2)",
    )
    bit_depth: int = Field(16, ge=8, le=16, description="ADC bits; values clip at 2**bit_depth - 1")


class SampleConfig(_Strict):
    """The labelled 3D structure; positions are generated once per seed."""

    structure: Literal["filaments", "ring", "uniform"] = Field(
        "filaments",
        description="filaments: smooth random 3D curves crossing the slide (microtubule-"
        "like); ring: hollow cylinders (centriole/pore-like, scaled up); uniform: random 3D. "
        "Generated over the whole slide (simulation.slide_fields; one field by default)",
    )
    n_filaments: int = Field(
        4, ge=1, description="number of filaments (structure=filaments), through the slide's central part"
    )
    labels_per_um: float = Field(
        150.0,
        gt=0,
        description="molecules per um of filament (structure=filaments), or per um of "
        "circumference for a flat ring (ring_height_nm=0)",
    )
    ring_diameter_nm: float = Field(2000.0, gt=0, description="ring/cylinder diameter (nm)")
    ring_height_nm: float = Field(
        400.0, ge=0, description="cylinder height along z (nm); 0 gives a flat ring"
    )
    n_rings: int = Field(3, ge=1, description="number of rings on the slide (structure=ring)")
    density_per_um2: float = Field(
        200.0,
        gt=0,
        description="molecules per um^2: of the slide (structure=uniform) or of the "
        "cylinder wall (structure=ring)",
    )
    z_range_nm: float = Field(
        600.0, ge=0, description="axial extent (nm) of the structure, centred on z=0"
    )
    label_jitter_nm: float = Field(
        8.0,
        ge=0,
        description="rms 3D offset of each dye from the structure (antibody linkage)",
    )


class PhotophysicsConfig(_Strict):
    """dSTORM-like blinking and bleaching of a photoswitchable dye (Alexa 647-like).

    Lasers are taken as triggered by the camera: they illuminate only during
    the exposure, so a longer frame interval spares the dye.
    """

    k_on_base_per_s: float = Field(
        0.01, ge=0, description="spontaneous off→on rate (1/s), also in the dark"
    )
    k_on_per_mw_per_s: float = Field(
        0.0006,
        ge=0,
        description="off→on rate per mW of activation laser (1/s/mW): at 100 mW the "
        "rate is 0.07/s, i.e. ~0.3 % of the molecules are on in a 20 ms frame",
    )
    k_off_per_s: float = Field(
        30.0, gt=0, description="on→off rate (1/s): mean on-time ~33 ms, blinks span frames"
    )
    photons_per_mw_per_s: float = Field(
        4000.0,
        ge=0,
        description="photon rate reaching the camera while on, per mW of excitation "
        "(before QE): 2e5 photons/s at 50 mW, ~2000 photons per on-emitter in a 20 ms frame",
    )
    widefield_photons_per_mw_per_s: float = Field(
        80.0,
        ge=0,
        description="photon rate reaching the camera per molecule per mW of excitation in the "
        "Widefield channel (before QE), where every unbleached molecule emits at once: 2 % of an "
        "on-emitter's rate, a dim ensemble image (80 photons per molecule in a 20 ms frame at 50 mW, "
        "a few hundred photons/px along a filament)",
    )
    bleach_per_photon: float = Field(
        1.0 / 20000.0,
        ge=0,
        le=1,
        description="bleaching probability per emitted photon: ~5000 photons per blink "
        "and ~4 blinks per molecule at 50 mW; bleaching grows with excitation dose",
    )
    background_photons_per_mw_per_s_per_px: float = Field(
        20.0,
        ge=0,
        description="background photon rate per pixel per mW of excitation: "
        "20 photons/px in a 20 ms frame at 50 mW",
    )


class DriftConfig(_Strict):
    """Slow axial drift of the sample relative to the focal plane."""

    focus_drift_nm_per_s: float = Field(
        2.0, description="deterministic drift rate: d(focus_offset_nm)/dt (nm/s)"
    )
    focus_noise_nm: float = Field(
        2.0, ge=0, description="random-walk amplitude of the drift (nm per sqrt(s))"
    )


class LiveConfig(_Strict):
    """Live mode: a densely labelled, mitochondria-like tubular network that moves and divides.

    The labelled volume (a matrix dye, e.g. mito-GFP) glows in proportion to
    the excitation power and bleaches with the excitation dose; the camera sees
    it through the same astigmatic PSF and noise model as the SMLM mode. At
    excitation 50 mW and 20 ms exposures a 300 nm tubule peaks at about 300
    photons/px over a background of 10 photons/px, and the fluorescence halves
    in about 500 such frames. Fission: at random places (``fission_rate_per_um_per_s``)
    a tubule constricts to a neck over ``constriction_s``, then divides and its
    two new ends retract over ``division_s``.
    """

    length_density_um_per_um2: float = Field(
        0.5, gt=0, le=10, description="tubule length per field area (um / um^2): how crowded the network is"
    )
    tubule_length_min_um: float = Field(1.5, gt=0, description="shortest main tubule (um)")
    tubule_length_max_um: float = Field(6.0, gt=0, description="longest main tubule (um)")
    branches_per_um: float = Field(
        0.15, ge=0, description="side branches per um of main tubule (each a tubule of its own)"
    )
    branch_length_um: float = Field(
        1.5, gt=0, description="typical side-branch length (um; drawn from 0.5x to 1.5x this)"
    )
    tubule_width_min_nm: float = Field(200.0, gt=0, description="narrowest tubule diameter (nm)")
    tubule_width_max_nm: float = Field(400.0, gt=0, description="widest tubule diameter (nm)")
    width_variation: float = Field(
        0.1, ge=0, lt=0.5, description="rms relative variation of the diameter along a tubule (smooth)"
    )
    persistence_length_um: float = Field(
        3.0, gt=0, description="bending stiffness of the tubules (um): larger is straighter"
    )
    z_range_nm: float = Field(
        300.0, ge=0, description="axial extent (nm) of the network, centred on z=0"
    )
    photons_per_mw_per_s_per_um3: float = Field(
        2.0e5,
        ge=0,
        description="photons reaching the camera per um^3 of labelled tubule per mW of excitation "
        "per s (before QE and bleaching)",
    )
    background_photons_per_mw_per_s_per_px: float = Field(
        10.0, ge=0, description="background photons per pixel per mW of excitation per s"
    )
    bleach_per_mj: float = Field(
        0.0014,
        ge=0,
        description="photobleaching per excitation dose (1/mJ, dose = power x exposure): "
        "fluorescence = exp(-bleach_per_mj * dose_mJ)",
    )
    motion_nm_per_s: float = Field(
        10.0, ge=0, description="rms speed (nm/s) of the network's smooth deformation"
    )
    motion_amplitude_nm: float = Field(
        300.0, gt=0, description="rms excursion (nm) of the deformation (with the speed, sets its time scale)"
    )
    drift_x_nm_per_s: float = Field(0.0, description="uniform lateral drift of the sample along x (nm/s)")
    drift_y_nm_per_s: float = Field(0.0, description="uniform lateral drift of the sample along y (nm/s)")
    fission_rate_per_um_per_s: float = Field(
        0.005, ge=0, description="fission onsets per um of tubule per s (Poisson, anywhere that can divide)"
    )
    fission_step_s: float | None = Field(
        0.1,
        gt=0,
        description="onsets are drawn on a fixed time grid of this step (s), whatever the frame times, so "
        "two runs of one seed see the same events however their policies time the frames; null: drawn over "
        "each frame's interval (the event model's training episodes were drawn so)",
    )
    constriction_s: float = Field(
        4.0, gt=0, description="duration (s) of the constriction from onset to division"
    )
    division_s: float = Field(
        1.0, gt=0, description="duration (s) of the division: the two new ends retract"
    )
    neck_width_nm: float = Field(
        80.0, gt=0, description="diameter (nm) of the neck at the moment of division"
    )
    neck_length_nm: float = Field(
        300.0, gt=0, description="length (nm, FWHM along the tubule) of the constricted neck"
    )
    retraction_nm: float = Field(
        300.0, ge=0, description="how far (nm) each new end retracts after division"
    )
    fusion_s: float | None = Field(
        30.0,
        gt=0,
        description="mean time (s, exponential) after a division until its two ends fuse back, so the "
        "network does not fragment for good; null: never",
    )
    min_fragment_um: float = Field(
        0.5,
        ge=0,
        description="fission only where both daughters are at least this long (um) and "
        "away from other ongoing events",
    )

    @model_validator(mode="after")
    def _ranges(self) -> LiveConfig:
        for low, high in (
            ("tubule_length_min_um", "tubule_length_max_um"),
            ("tubule_width_min_nm", "tubule_width_max_nm"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{low} ({getattr(self, low)}) must be <= {high} ({getattr(self, high)})"
                )
        if self.neck_width_nm >= self.tubule_width_min_nm:
            raise ValueError(
                f"neck_width_nm ({self.neck_width_nm}) must be < tubule_width_min_nm "
                f"({self.tubule_width_min_nm}): a constriction narrows the tubule"
            )
        return self


class SimulationConfig(_Strict):
    """Everything the simulated microscope needs; the defaults are the demo."""

    mode: Literal["smlm", "live"] = Field(
        "smlm",
        description="smlm: sparse blinking emitters on `sample` (dSTORM); live: the densely "
        "labelled tubular network of `live`, imaged as widefield fluorescence, with fission events",
    )
    optics: OpticsConfig = Field(default_factory=OpticsConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    photophysics: PhotophysicsConfig = Field(default_factory=PhotophysicsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    live: LiveConfig = Field(default_factory=LiveConfig)
    focal_plane_um: float = Field(
        0.0, description="stage Z (um) at which the sample's z=0 is in focus, before drift"
    )
    rotation_axis: Literal["x", "y"] = Field(
        "y", description="in-plane axis (through the field centre) the rotation stage turns about"
    )
    slide_fields: tuple[Annotated[int, Field(ge=1, le=16)], Annotated[int, Field(ge=1, le=16)]] = Field(
        (1, 1),
        description="(nx, ny): the slide, the area the SMLM sample is generated in, in fields of view; "
        "the XY stage moves the field over it. (1, 1): the sample fills exactly the field (live mode "
        "supports only that)",
    )

    @model_validator(mode="after")
    def _live_is_one_field(self) -> SimulationConfig:
        if self.mode == "live" and tuple(self.slide_fields) != (1, 1):
            raise ValueError(
                f"slide_fields {list(self.slide_fields)}: live mode simulates one field of view, so the "
                "slide must be [1, 1]"
            )
        return self
