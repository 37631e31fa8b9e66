/* IMP SDK 1.1.1 (T31, 2020-05-08) struct layouts, transcribed from
 * include/imp/imp_common.h, imp_isp.h, imp_framesource.h, imp_encoder.h of
 * cgrrty/Ingenic-SDK-T31-1.1.1-20200508.  Shared by the fake libimp and the
 * layout cross-check (compiled for the host and for mipsel o32).
 * Later releases differ in a few structs (impv4l2/driver/t31/structs.py
 * SDK_STRUCTS): *_114, *_115 and *_116 are those layouts (gtxaspec/ingenic-headers
 * T31/<release>/imp/). */
#ifndef IMP_ABI_H
#define IMP_ABI_H
#include <stdint.h>
#include <stdbool.h>

typedef enum { DEV_ID_FS, DEV_ID_ENC, DEV_ID_DEC, DEV_ID_IVS, DEV_ID_OSD } IMPDeviceID;
typedef struct { IMPDeviceID deviceID; int groupID; int outputID; } IMPCell;

typedef struct {
    int index; int pool_idx;
    uint32_t width; uint32_t height; uint32_t pixfmt; uint32_t size;
    uint32_t phyAddr; uint32_t virAddr;
    int64_t timeStamp;
    uint32_t priv[0];
} IMPFrameInfo;

typedef struct {        /* T31 1.1.6: timeStamp stays at 0x20, rotate_osdflag appended (48 bytes) */
    int index; int pool_idx;
    uint32_t width; uint32_t height; uint32_t pixfmt; uint32_t size;
    uint32_t phyAddr; uint32_t virAddr;
    int64_t timeStamp; int rotate_osdflag; uint32_t priv[0];
} IMPFrameInfo_116;

typedef struct { char type[20]; int addr; int i2c_adapter_id; } IMPI2CInfo;
typedef struct { char modalias[32]; int bus_num; } IMPSPIInfo;
typedef struct {
    char name[32];
    int cbus_type;      /* IMPSensorControlBusType: I2C=1, SPI=2 */
    union { IMPI2CInfo i2c; IMPSPIInfo spi; };
    unsigned short rst_gpio; unsigned short pwdn_gpio; unsigned short power_gpio;
} IMPSensorInfo;

typedef struct { int enable; int left; int top; int width; int height; } IMPFSChnCrop;
typedef struct { int enable; int outwidth; int outheight; } IMPFSChnScaler;
typedef struct {
    int picWidth; int picHeight; int pixFmt;
    IMPFSChnCrop crop; IMPFSChnScaler scaler;
    int outFrmRateNum; int outFrmRateDen; int nrVBs; int type;
    IMPFSChnCrop fcrop;
} IMPFSChnAttr;
typedef struct {        /* 1.1.5, 1.1.5.2: no fcrop (60 bytes) */
    int picWidth; int picHeight; int pixFmt;
    IMPFSChnCrop crop; IMPFSChnScaler scaler;
    int outFrmRateNum; int outFrmRateDen; int nrVBs; int type;
} IMPFSChnAttr_115;

typedef struct { char aVersion[64]; } IMPVersion;   /* imp_system.h */

typedef union { int h264NalType; int h265NalType; } IMPEncoderNalType;
typedef struct {
    uint32_t offset; uint32_t length; int64_t timestamp;
    bool frameEnd; IMPEncoderNalType nalType; int sliceType;
} IMPEncoderPack;
typedef struct {
    uint32_t phyAddr; uint32_t virAddr; uint32_t streamSize;
    IMPEncoderPack *pack; uint32_t packCount; uint32_t seq;
} IMPEncoderStream;

typedef struct { int32_t iNumBytes; int16_t iQPfactor; } IMPEncoderJpegInfo;
typedef struct {
    int32_t iNumBytes; uint32_t uNumIntra; uint32_t uNumSkip; uint32_t uNumCU8x8;
    uint32_t uNumCU16x16; uint32_t uNumCU32x32; uint32_t uNumCU64x64;
    int16_t iSliceQP; int16_t iMinQP; int16_t iMaxQP;
} IMPEncoderStreamInfo;
typedef struct {        /* 1.1.4: the info union right after seq (60 bytes on o32) */
    uint32_t phyAddr; uint32_t virAddr; uint32_t streamSize;
    IMPEncoderPack *pack; uint32_t packCount; uint32_t seq;
    union { IMPEncoderStreamInfo streamInfo; IMPEncoderJpegInfo jpegInfo; };
} IMPEncoderStream_114;
typedef struct {        /* 1.1.5: streamInfo ends with isVI */
    int32_t iNumBytes; uint32_t uNumIntra; uint32_t uNumSkip; uint32_t uNumCU8x8;
    uint32_t uNumCU16x16; uint32_t uNumCU32x32; uint32_t uNumCU64x64;
    int16_t iSliceQP; int16_t iMinQP; int16_t iMaxQP; uint8_t isVI;
} IMPEncoderStreamInfo_115;
typedef struct {        /* 1.1.5 (60 bytes on o32) */
    uint32_t phyAddr; uint32_t virAddr; uint32_t streamSize;
    IMPEncoderPack *pack; uint32_t packCount; uint32_t seq;
    union { IMPEncoderStreamInfo_115 streamInfo; IMPEncoderJpegInfo jpegInfo; };
} IMPEncoderStream_115;
typedef struct {        /* 1.1.6 */
    uint32_t phyAddr; uint32_t virAddr; uint32_t streamSize;
    IMPEncoderPack *pack; uint32_t packCount; uint32_t seq;
    bool isVI;
    union { IMPEncoderStreamInfo streamInfo; IMPEncoderJpegInfo jpegInfo; };
} IMPEncoderStream_116;

typedef struct { bool enable; uint32_t x; uint32_t y; uint32_t w; uint32_t h; } IMPEncoderCropCfg;
typedef struct {
    int eProfile; uint8_t uLevel; uint8_t uTier; uint16_t uWidth; uint16_t uHeight;
    int ePicFormat; uint32_t eEncOptions; uint32_t eEncTools;
    IMPEncoderCropCfg crop;
} IMPEncoderEncAttr;
typedef struct {
    int uGopCtrlMode; uint16_t uGopLength; uint8_t uNumB; uint32_t uMaxSameSenceCnt;
    bool bEnableLT; uint32_t uFreqLT; bool bLTRC;
} IMPEncoderGopAttr;
typedef struct { int16_t iInitialQP; } IMPEncoderAttrFixQP;
typedef struct {
    uint32_t uTargetBitRate; int16_t iInitialQP; int16_t iMinQP; int16_t iMaxQP;
    int16_t iIPDelta; int16_t iPBDelta; uint32_t eRcOptions; uint32_t uMaxPictureSize;
} IMPEncoderAttrCbr;
typedef struct {
    uint32_t uTargetBitRate; uint32_t uMaxBitRate; int16_t iInitialQP; int16_t iMinQP;
    int16_t iMaxQP; int16_t iIPDelta; int16_t iPBDelta; uint32_t eRcOptions;
    uint32_t uMaxPictureSize;
} IMPEncoderAttrVbr;
typedef struct {
    uint32_t uTargetBitRate; uint32_t uMaxBitRate; int16_t iInitialQP; int16_t iMinQP;
    int16_t iMaxQP; int16_t iIPDelta; int16_t iPBDelta; uint32_t eRcOptions;
    uint32_t uMaxPictureSize; uint16_t uMaxPSNR;
} IMPEncoderAttrCappedVbr;
typedef IMPEncoderAttrCappedVbr IMPEncoderAttrCappedQuality;
typedef struct {
    int rcMode;
    union {
        IMPEncoderAttrFixQP attrFixQp; IMPEncoderAttrCbr attrCbr; IMPEncoderAttrVbr attrVbr;
        IMPEncoderAttrCappedVbr attrCappedVbr; IMPEncoderAttrCappedQuality attrCappedQuality;
    };
} IMPEncoderAttrRcMode;
typedef struct { uint32_t frmRateNum; uint32_t frmRateDen; } IMPEncoderFrmRate;
typedef struct { IMPEncoderAttrRcMode attrRcMode; IMPEncoderFrmRate outFrmRate; } IMPEncoderRcAttr;
typedef struct { IMPEncoderEncAttr encAttr; IMPEncoderRcAttr rcAttr; IMPEncoderGopAttr gopAttr; } IMPEncoderChnAttr;
typedef struct {
    bool registered; uint32_t leftPics; uint32_t leftStreamBytes; uint32_t leftStreamFrames;
    uint32_t curPacks; uint32_t work_done;
} IMPEncoderChnStat;

#endif
